"""VAE decode in slices (issue 24): the slice size from free memory or SPO_VAE_DECODE_BATCH, halving on
out-of-memory, and images equal to the unsliced decode."""

from __future__ import annotations

import pytest
import torch

from spo_runtime.model.vae_slices import BYTES_PER_PIXEL_HALF, decode_in_slices, rows_per_slice


def test_slice_size_from_the_limit_or_free_memory():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    px = 1024 * 1024
    assert rows_per_slice(8, px, torch.float16, cpu) == 8  # the host is not probed
    assert rows_per_slice(8, px, torch.float16, cpu, limit=3) == 3
    assert rows_per_slice(2, px, torch.float16, cpu, limit=3) == 2
    per_row = px * BYTES_PER_PIXEL_HALF
    # a 24 GB card with ~14 GB free after the UNet and the batch: 7 rows of ~1.5 GiB in 80% of it
    assert rows_per_slice(8, px, torch.float16, cuda, free_bytes=14 * 2**30) == int(14 * 2**30 * 0.8) // per_row == 7
    assert rows_per_slice(8, px, torch.float32, cuda, free_bytes=14 * 2**30) == 3  # twice the bytes per pixel
    assert rows_per_slice(8, px, torch.float16, cuda, free_bytes=2**20) == 1  # never 0
    assert rows_per_slice(8, px, torch.float16, cuda, free_bytes=140 * 2**30) == 8


class OomAbove:
    """A decoder that runs out of memory on more than `k` rows, recording each call's rows."""

    def __init__(self, k: int):
        self.k, self.calls = k, []

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls.append(z.shape[0])
        if z.shape[0] > self.k:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return z * 2 + 1


def test_slices_concatenate_to_the_whole_and_halve_on_oom():
    z = torch.randn(8, 4, 8, 8)
    dec = OomAbove(8)
    assert torch.equal(decode_in_slices(dec, z, 3), z * 2 + 1) and dec.calls == [3, 3, 2]
    dec, emptied = OomAbove(2), []
    out = decode_in_slices(dec, z, 8, on_oom=lambda: emptied.append(1))
    assert torch.equal(out, z * 2 + 1)
    assert dec.calls == [8, 4, 2, 2, 4, 2, 2] and len(emptied) == 3
    with pytest.raises(torch.cuda.OutOfMemoryError):
        decode_in_slices(OomAbove(0), z[:1], 8)
    with pytest.raises(ValueError):  # other errors are not retried
        decode_in_slices(lambda t: (_ for _ in ()).throw(ValueError("bad")), z, 8)


def test_a_sliced_decode_equals_the_whole_batch(tiny_dir):
    """The tiny pipeline with SPO_VAE_DECODE_BATCH=1 and 2 gives the images of one VAE call (within 1/255)."""
    import numpy as np

    from spo_runtime import Settings, load_pipeline

    requests = [{"prompt": f"a fox {i}", "seed": i, "num_inference_steps": 2} for i in range(3)]
    images = {}
    for k in (None, 1, 2):
        pipe = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), vae_decode_batch=k))
        assert pipe.info()["speed"]["vae_decode_batch"] == k
        images[k] = [np.asarray(r.image, dtype=np.int16) for r in pipe.generate(requests)]
    for k in (1, 2):
        assert max(int(np.abs(a - b).max()) for a, b in zip(images[None], images[k])) <= 1
