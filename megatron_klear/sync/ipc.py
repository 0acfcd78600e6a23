"""The CUDA IPC weight transport of colocated SGLang servers (``rollout.sglang.mode=colocated``).

Each bucket goes to a server as ``/update_weights_from_tensor`` with one serialized payload per
engine TP rank (load format ``flattened_bucket``): SGLang's flattened bucket
(``inference.sglang_api.flatten_bucket``) pickled by ``serialize_payload``, in which a CUDA
tensor travels as an IPC handle that TP rank ``i`` opens on its own GPU (on CPU: shared memory).
``IPCTransport`` is the engine's single-process path (``SGLangEngine.update_bucket``: this
process holds the bucket and serializes one copy per TP rank, on that rank's GPU); the trainer's
multi-rank path, where every training rank serializes its own GPU's copy, is
``sync.colocated``, which reads the servers' ``ColocatedTarget`` from the engine
(``SGLangEngine.colocated_targets``).

Layer: the engine (``inference.sglang``) calls this module, so it sits beside the engines
(tests/unit/test_style.py: ``MODULE_LAYERS``) and imports nothing above them.
"""

from __future__ import annotations

import base64
import io
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from torch.multiprocessing import reductions

from megatron_klear import debug
from megatron_klear.errors import ArgumentError, EngineError
from megatron_klear.inference import sglang_api as api
from megatron_klear.inference.base import Bucket
from megatron_klear.inference.sglang_servers import Server, ServerPool


@dataclass
class ColocatedTarget:
    """Where the payloads of one colocated server go: its URL and the GPUs of its TP ranks,
    in TP order (payload i is read by TP rank i, on ``gpus[i]``)."""

    url: str
    gpus: list[int]


def serialize_payload(flat: torch.Tensor, meta: list[SimpleNamespace]) -> str:
    """SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)`` of
    ``{"flattened_tensor": flat, "metadata": meta}``: base64 of a ForkingPickler dump, in which
    a CUDA tensor travels as an IPC handle naming its GPU by UUID (``device_uuid_args``) and a
    CPU tensor as shared memory (the process must use
    ``torch.multiprocessing.set_sharing_strategy("file_system")``, see ``share_cpu_tensors``).
    Keep ``flat`` alive until the server has answered. In debug mode (``megatron_klear.debug``)
    the payload's globals are checked against SGLang's allow-list."""
    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    pickler.dispatch_table[torch.Tensor] = _reduce_tensor_by_uuid  # this pickler's own table
    pickler.dump({"flattened_tensor": flat, "metadata": meta})
    payload = base64.b64encode(buf.getvalue()).decode("utf-8")
    if debug.enabled():
        check_payload(payload)
    return payload


# Every global our payloads name: the byte-flattened bucket (a uint8 tensor) with its metadata
# (types.SimpleNamespace of torch.Size and the weights' dtypes), as a CUDA IPC handle
# (rebuild_cuda_tensor) or, on CPU, a shared-memory file (rebuild_tensor and storage). SGLang's
# SafeUnpickler (srt/utils/common.py, 0.5.23) allows an exact list of (module, name) pairs and
# refuses anything else, so this is an exact list too (each name in SGLang's, tested against the
# installed SGLang), not a prefix match: "torch." would pass torch.load, "builtins." eval.
PAYLOAD_GLOBALS = frozenset(
    {
        "types.SimpleNamespace",
        "torch.Tensor",
        "torch.Size",
        "torch.uint8",
        "torch.float32",
        "torch.bfloat16",
        "torch.float16",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
        "torch.multiprocessing.reductions.rebuild_cuda_tensor",
        "torch.multiprocessing.reductions.rebuild_tensor",
        "torch.multiprocessing.reductions.rebuild_typed_storage",
        "torch.multiprocessing.reductions.rebuild_storage_filename",
    }
)


def check_payload(payload: str) -> None:
    """``ArgumentError`` naming every global of ``payload`` outside ``PAYLOAD_GLOBALS``: SGLang
    would refuse to unpickle it (its scheduler logs the refusal and the update fails)."""
    extra = sorted(payload_globals(payload) - PAYLOAD_GLOBALS)
    if extra:
        raise ArgumentError(f"a weight payload names globals SGLang's unpickler refuses: {extra}")


# Argument 6 of torch's ``rebuild_cuda_tensor`` (``reduce_tensor``'s output): the device.
CUDA_DEVICE_ARG = 6


def device_uuid_args(args: tuple, uuid_of: Callable[[int], str]) -> tuple:
    """``rebuild_cuda_tensor``'s arguments with the device index replaced by the GPU's UUID
    (``uuid_of(index)``), as SGLang's own senders write them (``patch_torch``, SGLang 0.5.x): its
    receivers map the UUID back to their own index before rebuilding, so a server whose
    ``CUDA_VISIBLE_DEVICES`` numbers the GPUs differently still opens the handle on the right
    one, where a bare index would name another GPU. An argument that is not an index already
    names its GPU and stays."""
    device = args[CUDA_DEVICE_ARG]
    if not isinstance(device, int):
        return args
    return (*args[:CUDA_DEVICE_ARG], uuid_of(device), *args[CUDA_DEVICE_ARG + 1 :])


def _reduce_tensor_by_uuid(t: torch.Tensor):
    rebuild, args = reductions.reduce_tensor(t)
    if t.is_cuda:
        args = device_uuid_args(args, lambda i: str(torch.cuda.get_device_properties(i).uuid))
    return rebuild, args


def load_payload(payload: str, devices_sent: Optional[list] = None) -> dict:
    """What an SGLang TP rank does with its payload, for our checks of the sending side (SGLang
    is not on our GPU test machine): base64-decode and unpickle it, a GPU named by UUID mapped
    back to this process's device index first, as SGLang's patched torch does. ``devices_sent``
    collects the device argument of every CUDA handle as it was sent."""

    def rebuild_cuda_tensor(*args):
        device = args[CUDA_DEVICE_ARG]
        if devices_sent is not None:
            devices_sent.append(device)
        if isinstance(device, str):
            uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
            if device not in uuids:
                raise EngineError(f"no GPU visible here has the UUID {device} (visible: {uuids})")
            args = (*args[:CUDA_DEVICE_ARG], uuids.index(device), *args[CUDA_DEVICE_ARG + 1 :])
        return reductions.rebuild_cuda_tensor(*args)

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
                return rebuild_cuda_tensor
            return super().find_class(module, name)

    return _Unpickler(io.BytesIO(base64.b64decode(payload))).load()


def payload_globals(payload: str) -> set[str]:
    """The module-qualified globals a serialized payload refers to (checked against what
    SGLang's unpickler allows: ``check_payload``). Reads the pickle with inert stand-ins for
    every global, so nothing is rebuilt or opened."""

    class _Inert:
        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)

        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

    names: set[str] = set()

    class _Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            names.add(f"{module}.{name}")
            return type(name, (_Inert,), {})

    _Recorder(io.BytesIO(base64.b64decode(payload))).load()
    return names


def share_cpu_tensors() -> None:
    """CPU tensors reach a server by file name: with the default file-descriptor strategy
    the server's scheduler dies when it unpickles them (seen with SGLang 0.5.23 on CPU)."""
    torch.multiprocessing.set_sharing_strategy("file_system")


class IPCTransport:
    """Single-process colocated updates: one payload per engine TP rank, servers in parallel."""

    def __init__(self, pool: ServerPool, device: str):
        self.pool, self.device = pool, device
        if device == "cpu":
            share_cpu_tensors()

    def targets(self) -> list[ColocatedTarget]:
        """Every server's URL and GPUs (for the trainer's multi-rank path, ``sync.colocated``)."""
        return [ColocatedTarget(s.url, list(s.gpus)) for s in self.pool.servers]

    def open(self) -> None:
        """Nothing to set up: every request carries its own payloads."""

    def send(self, bucket: Bucket, version: str) -> None:
        """Post ``bucket`` to every server: one serialized copy per TP rank, on that rank's GPU
        (one shared copy on CPU)."""
        flat, meta = api.flatten_bucket(api.bucket_order(bucket))

        def one(s: Server) -> None:
            copies = [flat] * len(s.gpus) if self.device == "cpu" else [flat.to(f"cuda:{g}") for g in s.gpus]
            payloads = [serialize_payload(c, meta) for c in copies]
            self.pool.post(s, "/update_weights_from_tensor", api.update_from_tensor_request(payloads, version))
            del copies  # alive until the server has answered

        with ThreadPoolExecutor(len(self.pool.servers)) as pool:
            for f in [pool.submit(one, s) for s in self.pool.servers]:
                f.result()
        if self.device == "cuda":
            torch.cuda.ipc_collect()

    def blocked(self) -> set[int]:
        """Servers a broken-off sync may have left unreachable: none (every post returns)."""
        return set()

    def after_restart(self) -> None:
        """Nothing to rebuild after a restart."""

    def close(self) -> None:
        """Nothing is held between syncs."""
