"""scanagram: derive prefill and step functions from a causal JAX function.

Write the training mode once; ``as_scan`` / ``to_step`` give the step (and
prefill) that generates one element at a time.
"""
from scanagram.api import StepFunctions, as_scan, as_scan_with_prefill, to_step
from scanagram.associative import associative_scan
from scanagram.by_reference import convert_as
from scanagram.custom import custom_scanagram
from scanagram.errors import ScanConversionError
from scanagram.explain import CarryLeaf, describe_carry, explain
from scanagram import nn, sampling
from scanagram.stepping import StepPair, Stepper

__version__ = "0.1.0"
__all__ = ["as_scan", "as_scan_with_prefill", "to_step", "StepFunctions",
           "ScanConversionError", "custom_scanagram", "associative_scan",
           "explain", "describe_carry", "CarryLeaf", "convert_as"]
__all__ += ["StepPair", "Stepper", "sampling", "nn"]
