"""The benchmark Fashion-MNIST DiT (benchmarks/models/fmnist_dit_b/): its sharded bf16 layout round-trips,
and the committed checkpoint loads and reproduces its stored forward at batch 2.

The second test skips only while the checkpoint is absent from the repository (it is trained on a GPU with
benchmarks/gpu_testbed.sh and committed with its stored output); once committed, it runs in CI on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dqcompile.fmnist.benchmark import (
    BENCHMARK_DIT_CONFIG,
    INDEX_NAME,
    REFERENCE_OUTPUT_NAME,
    benchmark_config,
    benchmark_model_dir,
    load_benchmark_model,
    load_model_folder,
    reference_inputs,
    save_benchmark_model,
    write_reference_output,
)
from dqcompile.fmnist.dit import FMNIST_DIT_CONFIG, build_fmnist_dit

TINY = {**FMNIST_DIT_CONFIG, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16}


def test_sharded_bf16_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_fmnist_dit(TINY).eval()
    import dqcompile.fmnist.benchmark as benchmark

    paths = benchmark.save_sharded(model.state_dict(), tmp_path, max_shard_bytes=100_000)
    assert len(paths) > 1 and all(path.stat().st_size < 200_000 for path in paths)
    save_benchmark_model(model, tmp_path, model_config=TINY)
    assert (tmp_path / INDEX_NAME).is_file() and benchmark_config(tmp_path)["model"] == TINY
    loaded = load_benchmark_model(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16).float()), name
    same, config = load_model_folder(tmp_path)
    assert config["null_class_id"] == 10 and same.config.num_layers == 2
    write_reference_output(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**reference_inputs()).sample, load_file(tmp_path / REFERENCE_OUTPUT_NAME)["sample"])
    with pytest.raises(FileNotFoundError, match="gpu_testbed.sh"):
        load_benchmark_model(tmp_path / "absent")


def test_benchmark_parameters_are_at_least_4x_the_embedded_model() -> None:
    with torch.device("meta"):
        embedded = sum(p.numel() for p in build_fmnist_dit(FMNIST_DIT_CONFIG).parameters())
        benchmark = sum(p.numel() for p in build_fmnist_dit(BENCHMARK_DIT_CONFIG).parameters())
    assert benchmark >= 4 * embedded
    assert 2 * benchmark < 48 * 2**20  # bf16 shards that one device call can return beside its logs


@pytest.mark.skipif(not (benchmark_model_dir() / INDEX_NAME).is_file(),
                    reason="the benchmark checkpoint is not in the repository yet (benchmarks/gpu_testbed.sh trains it)")
def test_committed_checkpoint_reproduces_its_stored_output() -> None:
    model = load_benchmark_model()
    assert benchmark_config()["model"] == BENCHMARK_DIT_CONFIG
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    with torch.no_grad():
        output = model(**reference_inputs()).sample
    expected = load_file(benchmark_model_dir() / REFERENCE_OUTPUT_NAME)["sample"]
    assert output.shape == expected.shape == (2, 1, 32, 32)
    # Written on the training machine's CPU; another CPU or torch version may round a little differently.
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4)
