"""One random stream per DDP rank for the augmentation and mask draws of training.

Every rank seeds torch's global generators with the run seed, so draws taken from them (Kornia's
crop and jitter parameters, flips, masks, noise) are byte-identical on every rank: a global batch
would hold only one rank's worth of distinct views. Tasks and data modules draw inside
:class:`RandomStreams` instead, which swaps in this rank's own generators, seeded with
``seed + global rank`` as the official CMID code seeds its ranks (NJU-LHRS/official-CMID at
6e1de74, Pretrain/main_pretrain.py), and swaps the global state back afterwards. Pretraining tasks
save every rank's stream in the checkpoint, so a resumed run continues them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ('SEED_RULE', 'RandomStreams', 'run_seed')

#: How each rank's stream is seeded, as run cards record it.
SEED_RULE = 'augmentation and mask draws: seed + global rank'


def run_seed() -> int:
    """The run's seed: Lightning's ``seed_everything`` value, else torch's initial seed."""
    seed = os.environ.get('PL_GLOBAL_SEED')
    return int(seed) if seed is not None else torch.initial_seed() % 2**32


class RandomStreams:
    """This rank's generators (CPU and the accelerator), used in place of the global ones.

    Before :meth:`start` (a task used outside a trainer) draws use the global generators as
    they are, so ``torch.manual_seed`` keeps working in single-process code.
    """

    def __init__(self) -> None:
        """Create unstarted streams."""
        self.seed: int | None = None
        self._generators: dict[str, torch.Generator] = {}
        self._restored: dict[str, Tensor] = {}

    @property
    def started(self) -> bool:
        """Whether draws go through this rank's generators."""
        return self.seed is not None

    def start(self, seed: int, rank: int) -> None:
        """Seed the streams with ``seed + rank``, unless a checkpoint already restored them."""
        if self.seed is None:
            self.seed = seed + rank

    def generator(self, device: torch.device) -> torch.Generator:
        """The stream's generator on ``device``, created (or restored) on first use."""
        key = str(device)
        if key not in self._generators:
            assert self.seed is not None
            generator = torch.Generator(device).manual_seed(self.seed)
            if key in self._restored:
                generator.set_state(self._restored.pop(key))
            self._generators[key] = generator
        return self._generators[key]

    @contextmanager
    def __call__(self, device: torch.device) -> Iterator[None]:
        """Draw from this rank's generators on the CPU and ``device`` inside the block."""
        if self.seed is None:
            yield
            return
        cuda = device.type == 'cuda'
        with torch.random.fork_rng(devices=[device] if cuda else []):
            cpu = self.generator(torch.device('cpu'))
            torch.set_rng_state(cpu.get_state())
            if cuda:
                accelerator = self.generator(device)
                torch.cuda.set_rng_state(accelerator.get_state(), device)
            yield
            cpu.set_state(torch.get_rng_state())
            if cuda:
                accelerator.set_state(torch.cuda.get_rng_state(device))

    def state_dict(self, as_bytes: bool = False) -> dict[str, Any]:
        """The seed and the state of every generator (restored ones not used yet included).

        Args:
            as_bytes: Give the generator states as bytes rather than uint8 tensors.
        """
        states = self._restored | {k: g.get_state() for k, g in self._generators.items()}
        if as_bytes:
            as_raw = {key: state.numpy().tobytes() for key, state in states.items()}
            return {'seed': self.seed, 'states': as_raw}
        return {'seed': self.seed, 'states': states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the streams a :meth:`state_dict` describes."""
        self.seed = state['seed']
        self._generators = {}
        self._restored = {
            key: torch.frombuffer(bytearray(value), dtype=torch.uint8)
            if isinstance(value, bytes)
            else value
            for key, value in state['states'].items()
        }
