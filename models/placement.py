"""Where a batch lives: the trial axis sharded across this host's devices, the data replicated."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np


@dataclass(frozen=True)
class Placement:
    """The devices of one batch.

    With one device this is plain placement on it; with several, every group holds a multiple
    of the device count, and the compiled program runs each device's trials on that device.
    """

    trials: jax.sharding.Sharding | None
    replicated: jax.sharding.Sharding | None
    devices: int

    @classmethod
    def local(cls, num_trials: int) -> Placement:
        """This host's devices, at most one per trial (a device with no trial would only pad)."""
        devices = jax.local_devices()[: max(1, num_trials)]
        if len(devices) == 1:
            return cls(None, None, 1)
        mesh = jax.sharding.Mesh(np.asarray(devices), ("trials",))
        return cls(
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("trials")),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            len(devices),
        )

    def round_up(self, group_size: int) -> int:
        """The smallest multiple of the device count that holds `group_size` trials."""
        return -(-group_size // self.devices) * self.devices

    def shard(self, tree):
        """Place a pytree with a leading trial axis, that axis split across the devices."""
        return jax.device_put(tree, self.trials)

    def replicate(self, tree):
        """Place a pytree whole on every device (the data every trial reads)."""
        return tree if self.replicated is None else jax.device_put(tree, self.replicated)
