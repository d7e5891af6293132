"""One of the two processes of `test_checkpoint.py::test_two_processes_save_what_one_process_saves`.

Usage: two_process_save.py PORT PROCESS_ID SRC OUT. Joins a two-process gloo cluster (2 fake CPU devices
each), loads SRC sharded over a mesh that spans both processes (fsdp across them, tensor within), so
that no process holds a whole matrix, and writes OUT/ckpt (orbax) and OUT/hf (safetensors).
"""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

port, process_id, src, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from bidirlm_jax import from_pretrained, save_pretrained, sharding  # noqa: E402
from bidirlm_jax.io.checkpoint import save_checkpoint  # noqa: E402

mesh = sharding.make_mesh(1, 2, 2)
assert {d.process_index for d in mesh.devices[0, process_id]} == {process_id}  # fsdp splits the processes
model = from_pretrained(src, mesh=mesh)
embedding = model.embedder.embedding[...]
assert not embedding.is_fully_addressable and embedding.addressable_shards[0].data.shape[1] == embedding.shape[1] // 2
save_checkpoint(model, out / "ckpt")
save_pretrained(model, out / "hf")
