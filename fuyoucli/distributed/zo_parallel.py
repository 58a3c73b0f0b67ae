"""Data-parallel zeroth-order step: every rank holds the model, only loss sums and counts are exchanged.

Trainer stage, over torch.distributed (gloo: the messages are a few float64 scalars, so the CPU backend
serves GPU ranks too). All ranks draw the same z (the generator is seeded by (seed, step, direction,
block), never by the rank), evaluate their own share of the step's micro-batches in both perturbed
passes, and all-reduce (loss sum, target count); every rank then has the same projected gradient and
applies the same update, so the weights stay identical without ever being sent. Never imports rich.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fuyoucli.kernels.normal import z_source
from fuyoucli.model.blocks import param_blocks
from fuyoucli.recipe import Recipe
from fuyoucli.train.data import Datasets
from fuyoucli.train.losses import BatchLoss, batch_loss
from fuyoucli.train.trainers import StepOutcome, ZOHome, zo_outcome
from fuyoucli.train.zo import ZOReference


class Ranks:
    """This process's place in the group, and the collectives the ZO path and the run loop need."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes metrics.jsonl, checkpoints and the final model."""
        return self.rank == 0

    @classmethod
    def current(cls) -> "Ranks":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(0, 1)

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share of n items: the first n % world ranks take one more."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def share(self, items: list) -> list:
        start, stop = self.bounds(len(items))
        return items[start:stop]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64. Each rank's values are fp32 loss sums converted
        exactly, so for a handful of similar magnitudes the total is exact, whatever the order."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a stop request must end all ranks at one step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class DataParallelZO(ZOReference):
    """ZOReference with the step's loss summed over ranks. Overrides the one hook that reads data
    (_losses); perturbation, z and the update are the reference's own code, so a one-rank run is the
    in-memory reference itself and an N-rank run differs only in where each micro-batch is evaluated."""

    def __init__(self, *args, ranks: Ranks, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranks = ranks

    @torch.no_grad()
    def _losses(self, micro_batches: list[dict]) -> tuple[float, int]:
        total, count = 0.0, 0
        for mb in self.ranks.share(micro_batches):
            out = batch_loss(self.model, mb, head=self.head, label_token_ids=self.label_token_ids)
            total += float(out.loss_sum)
            count += out.count
        total, count = self.ranks.sum([total, float(count)])
        return total / max(count, 1.0), int(count)


class DataParallelZOTrainer:
    """The run loop's trainer interface (step, eval_losses, state for checkpoints) over DataParallelZO.
    Checkpoints hold what the in-memory zo2 trainer's hold, so either resumes the other's."""

    def __init__(self, model, recipe: Recipe, data: Datasets, ranks: Ranks, home: ZOHome):
        self.model, self.head, self.label_token_ids, self.ranks = model, recipe.model.head, data.label_token_ids, ranks
        self.home = home
        self.impl = DataParallelZO(model, param_blocks(model), recipe.method, seed=recipe.training.seed,
                                   head=self.head, label_token_ids=data.label_token_ids, home_dtype=home.torch_dtype,
                                   home_rounding=home.rounding, z_piece=home.z_piece, ranks=ranks)
        self.z_source = z_source(next(model.parameters()).device)
        self.where = (f"zo2 data-parallel: {ranks.world} ranks, each holds the model ({home.describe()}); "
                      "loss sums all-reduced")

    def step(self, step: int, micro: list[dict], lr: float) -> StepOutcome:
        return zo_outcome(self.impl.step(step, micro, lr), self.home)

    @torch.no_grad()
    def eval_losses(self, micro: list[dict]) -> list[BatchLoss]:
        """Each rank evaluates its share; the (sum, count, correct) rows are summed into one table."""
        self.model.eval()
        start, _ = self.ranks.bounds(len(micro))
        rows = [0.0] * (3 * len(micro))
        for i, mb in enumerate(self.ranks.share(micro), start):
            out = batch_loss(self.model, mb, head=self.head, label_token_ids=self.label_token_ids)
            rows[3 * i:3 * i + 3] = [float(out.loss_sum), float(out.count), float(out.correct or 0)]
        rows = self.ranks.sum(rows)
        return [BatchLoss(torch.tensor(rows[3 * i]), int(rows[3 * i + 1]), int(rows[3 * i + 2]))
                for i in range(len(micro))]

    def finalize(self) -> None:
        pass

    def close(self) -> None:
        pass

    def state_shards(self):
        yield "", self.impl.state_tensors()

    def state_meta(self) -> dict:
        return {"trainer": "zo2", **self.home.checkpoint_meta(), "z_source": self.z_source}

    def load_state_dict(self, tensors, meta: dict) -> None:
        self.home.check(meta, self.impl.largest_tensor, self.z_source)
        self.impl.load_state_tensors(tensors)

    def replay(self, step: int, grads: list[float], lr: float) -> None:
        self.impl.replay(step, grads, lr)
