"""Resume a model with experts (ZeRO 1-2) at another data- or expert-parallel size than it was saved with.

What DeepSpeed saved. ZeRO 1-2 flatten each optimizer group's parameters into one fp32 vector and give each rank
of the group's data-parallel group one contiguous slice of it: its master weights
(``single_partition_of_fp32_groups[g]``), Adam's state over the same slice (``base_optimizer_state``) and where
each parameter's piece lies in the slice (``param_slice_mappings[g]``: name -> start, numel), one file per rank.
Dense groups are sliced over all ranks. Expert groups (DeepSpeed's ``moe`` groups) hold only the rank's local
experts, stacked on dim 0, and are sliced over the rank's expert-data-parallel group: expert-parallel groups are
contiguous ranks, so with E the expert-parallel size, rank r holds global experts ep_rank * E_local ... where
ep_rank = r % E, and the ranks r % E = e, taken in order, hold the slices of expert-parallel rank e's experts.

Why not DeepSpeed's converter: ``ds_to_universal`` (and ZeRO's own elastic loading) joins every rank's slice of a
group as if all were slices of one tensor; for experts they are slices of different experts (DeepSpeed issue
5716 asks for MoE support). So the tensors are rebuilt here, from the same files (their layout:
switchyard/deepspeed_compat.saved_zero_partitions):

1. ``engine.load_checkpoint`` without optimizer states loads the module (the dense weights, and each expert from
   its own file by global index, which works at any expert-parallel size), the learning-rate scheduler, the step
   counters and the client state; ZeRO takes its masters from the module's weights.
2. Every saved rank's file is read memory-mapped; each parameter's pieces, in the order of its group's ranks,
   make the whole tensor (of an expert parameter: one expert-parallel rank's local experts, and those, stacked in
   expert-parallel rank order, every expert of the layer), for the master weights and every state tensor.
3. Each parameter of the new engine is given its master and state through ``deepspeed.utils.safe_set_full_*``:
   the whole tensor, or, for an expert parameter (``allreduce`` False, DeepSpeed's tag), the experts this rank
   holds now; each optimizer group gets the saved group's hyper-parameters and step.

Nothing in the parameter names or shapes is assumed beyond that contract (any stacked expert tensors, any dense
ones), and nothing is written: the checkpoint stays as saved. Every rank reads every saved file (memory-mapped,
one parameter at a time), so the conversion needs no collective and no rank holds more than one whole parameter.
"""

import math

import torch
import torch.distributed as dist

from pretrain.run_dir import safe_load
from switchyard import deepspeed_compat
from switchyard.errors import ConfigError

MASTER = "fp32"  # the key of a parameter's master weights among its state tensors


class SavedZero:
    """The optimizer partitions of ZeRO 1-2 checkpoint ``directory``, every saved rank's, memory-mapped."""

    def __init__(self, directory):
        self.directory = directory
        saved = deepspeed_compat.saved_zero_partitions(directory, lambda path: safe_load(path, map_location="cpu", mmap=True))
        if isinstance(saved, str):
            raise self.unconvertible(saved)
        self.ranks, self.shapes = saved.ranks, saved.shapes  # shapes[g]: name -> shape (an expert's: its local experts, stacked)
        self.group_of = {name: g for g, shapes in enumerate(self.shapes) for name in shapes}

    def unconvertible(self, why):
        return ConfigError(
            f"--resume: checkpoint {self.directory} cannot be converted to this launch's data- or expert-parallel size "
            f"({why}); resume it with the data-parallel and expert-parallel sizes it was saved with"
        )

    def is_expert_group(self, g):
        return self.ranks[0].experts[g]

    def group_ranks(self, g):
        """The saved ranks whose slices make group ``g``, one list per expert-parallel rank (one list: dense)."""
        world = len(self.ranks)
        partitions = self.ranks[0].partitions[g]
        if not self.is_expert_group(g):
            if partitions != world:
                raise self.unconvertible(f"dense optimizer group {g} is split {partitions} ways on {world} ranks")
            return [list(range(world))]
        if world % partitions:
            raise self.unconvertible(f"expert optimizer group {g} is split {partitions} ways on {world} ranks")
        ep_size = world // partitions
        return [list(range(e, world, ep_size)) for e in range(ep_size)]

    def state_keys(self, g):
        """(names of group ``g``'s state tensors, which run over its slice, {the rest of its state: Adam's step}).
        They may be longer than the saved masters: they keep the slice's alignment padding, which ZeRO 1-2's masters
        leave out."""
        masters = self.ranks[0].masters[g].numel()
        state = self.ranks[0].state[g]
        tensors = [k for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() >= masters]
        return tensors, {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items() if k not in tensors}  # clone: off the mapped file

    def whole(self, name, key):
        """Saved parameter ``name``'s tensor ``key`` (MASTER or a state tensor's name), whole: an expert parameter's
        with every expert of its layer stacked on dim 0, in global expert order."""
        g = self.group_of[name]
        shape = tuple(self.shapes[g][name])
        stacked = []
        for ranks in self.group_ranks(g):  # expert-parallel rank by expert-parallel rank
            pieces = []
            for rank in ranks:  # the slices of one tensor, in partition order
                saved = self.ranks[rank]
                if name in saved.slices[g]:
                    start, numel = saved.slices[g][name]
                    pieces.append((saved.masters[g] if key == MASTER else saved.state[g][key]).narrow(0, start, numel))
            numel = sum(p.numel() for p in pieces)
            if numel != math.prod(shape):
                raise self.unconvertible(f"the slices of {name} hold {numel} values, its shape {shape} {math.prod(shape)}")
            stacked.append(torch.cat(pieces).view(shape))
        return torch.cat(stacked) if self.is_expert_group(g) else stacked[0]


def this_ranks_part(whole, param, name):
    """Of parameter ``name``'s whole saved tensor, what ``param`` holds on this rank: all of it, or, for an expert
    parameter, the local experts: global ep_rank * E_local ..., ep_rank = rank % expert-parallel size (DeepSpeed's
    expert-parallel groups are consecutive ranks; models/switch.py seeds each expert by that global index too)."""
    if getattr(param, "allreduce", True):  # dense
        if whole.shape != param.shape:
            raise ConfigError(f"--resume: {name} was saved with shape {tuple(whole.shape)} and this model has {tuple(param.shape)}")
        return whole
    n_local = param.shape[0]
    if whole.shape[1:] != param.shape[1:] or whole.shape[0] % n_local:
        raise ConfigError(
            f"--resume: the experts of {name} were saved as {tuple(whole.shape)} in all and this rank holds "
            f"{tuple(param.shape)} of them, which does not divide it"
        )
    ep_rank = dist.get_rank() % (whole.shape[0] // n_local)
    return whole[ep_rank * n_local : (ep_rank + 1) * n_local]


def load_optimizer_state(engine, directory):
    """Give ``engine`` (ZeRO 1-2, its module and scheduler already loaded from checkpoint ``directory`` without
    optimizer states) the fp32 masters and optimizer state that checkpoint saved, at the engine's sizes."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    saved = SavedZero(directory)
    groups = deepspeed_compat.zero_optimizer_groups(engine)
    if groups is None:
        raise saved.unconvertible("this launch's optimizer is not one of DeepSpeed's ZeRO 1-2 optimizers")
    names = {param: name for name, param in engine.module.named_parameters()}
    wanted = []
    for group in groups:
        group_names = [names[p] for p in group]
        matches = [g for g, shapes in enumerate(saved.shapes) if set(shapes) == set(group_names)]
        if not matches:
            raise saved.unconvertible(
                f"no saved optimizer group holds exactly {group_names[0]} and the {len(group_names) - 1} others of this launch's group"
            )
        g = matches[0]
        if saved.is_expert_group(g) != (getattr(group[0], "allreduce", True) is False):
            raise saved.unconvertible(f"{group_names[0]} is an expert parameter in one of the two and not in the other")
        keys, scalars = saved.state_keys(g)
        wanted.append({"keys": keys, "scalars": scalars, "settings": saved.ranks[0].settings[g]})

    def set_params():
        for group, want in zip(groups, wanted):
            for param in group:
                name = names[param]
                safe_set_full_fp32_param(param, this_ranks_part(saved.whole(name, MASTER), param, name))
                for key in want["keys"]:
                    safe_set_full_optimizer_state(param, this_ranks_part(saved.whole(name, key), param, name), key)

    deepspeed_compat.set_zero_optimizer_state(engine, wanted, saved.ranks[0].saved, set_params)
