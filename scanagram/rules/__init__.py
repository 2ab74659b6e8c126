"""Rules, one module per primitive family; importing this registers them."""
from scanagram.rules import (attention, calls, control_flow, elementwise,
                             linalg, reductions, shifts, structural)
