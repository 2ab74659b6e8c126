"""Rules, one module per primitive family; importing this registers them."""
from scanagram.rules import (attention, batched, calls, control_flow, elementwise,
                             indexing, linalg, reductions, shard_map, sharding,
                             shifts, structural)
