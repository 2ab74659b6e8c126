"""The only module that touches ``jax._src``.

Why: JAX's public API has no way to ask an equation *where in the user's code*
it was made, nor to give a new primitive a lowering and transformation rules.
Both are small, stable corners of JAX; keeping them here means a JAX upgrade
that moves them breaks one file.
"""
from jax._src import source_info_util
# jnp.split's, jnp.stack's, jnp.tile's and .at[].subtract's primitives; not
# re-exported
from jax._src.lax.lax import split_p, stack_p, tile_p, unstack_p
from jax._src.lax.slicing import scatter_sub_p
# jax.sharding.reshard's primitive (jnp inserts it under explicit mesh axes)
from jax._src.pjit import reshard_p
# jax.shard_map's primitive and the collectives jax.extend does not export
from jax._src.core import pvary_p
from jax._src.lax.parallel import (all_gather_invariant_p, pbroadcast_p,
                                   psum_invariant_p, reduce_scatter_p)
from jax._src.shard_map import shard_map_p
from jax._src.interpreters.partial_eval import (convert_constvars_jaxpr,
                                                dce_jaxpr)
from jax.interpreters import ad, batching, mlir

# custom_scanagram and associative_scan define primitives
# (scanagram/_call_primitives.py): their JVP, batching and lowering rules go
# in ad, batching and mlir, and the values its
# body closes over (possibly tracers) become operands with
# convert_constvars_jaxpr (jaxpr constvars -> leading invars).


def user_frames(source_info):
  """``(file, line, function)`` of the frames that made an equation,
  innermost first, JAX's own frames left out."""
  traceback = getattr(source_info, "traceback", None)
  return ((f.file_name, f.start_line, f.function_name)
          for f in source_info_util.user_frames(traceback))


def exclude_from_user_frames(path: str):
  """Frames in ``path`` are not the user's code: an equation bound there
  (``custom_scanagram``'s primitive) reports its caller's line instead."""
  source_info_util.register_exclusion(path)


def without_dead_code(jaxpr):
  """``jaxpr`` without the equations no output needs (inner jaxprs of calls
  and scans included), its inputs unchanged. JAX's own dead-code pass
  (``partial_eval.dce_jaxpr``) keeps effectful equations."""
  pruned, _ = dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
  return pruned


def traced_as(source_info):
  """A context in which traced equations get ``source_info`` (the user's
  line and module names of the equation they are rewritten from)."""
  return source_info_util.user_context(source_info.traceback,
                                       name_stack=source_info.name_stack)


def name_stack(source_info) -> str:
  """The transformation/module name stack (Haiku module names live here)."""
  stack = getattr(source_info, "name_stack", None)
  return str(stack) if stack is not None else ""


__all__ = ["user_frames", "name_stack", "traced_as", "without_dead_code", "split_p", "stack_p",
           "unstack_p", "tile_p", "scatter_sub_p", "reshard_p", "shard_map_p",
           "pvary_p", "psum_invariant_p", "reduce_scatter_p", "pbroadcast_p",
           "all_gather_invariant_p", "ad", "batching", "mlir"]
