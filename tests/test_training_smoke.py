"""The training scripts run tiny on CPU, and what they write loads with the package loaders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dqcompile.fmnist import data
from dqcompile.fmnist import sample
from dqcompile.fmnist.classifier import (
    CLASSIFIER_CHECKPOINT_NAME,
    CLASSIFIER_CONFIG,
    CLASSIFIER_CONFIG_NAME,
    build_classifier,
    classifier_record,
    load_classifier,
)
from dqcompile.fmnist.benchmark import (
    REFERENCE_OUTPUT_NAME,
    benchmark_config,
    benchmark_training_record,
    load_benchmark_model,
    reference_inputs,
)
from dqcompile.fmnist.dit import NULL_CLASS_ID, embedded_training_record, load_embedded_config, load_embedded_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
found = data.find_fashion_mnist("train")
pytestmark = pytest.mark.skipif(found is None, reason="Fashion-MNIST files not installed")
DATA_DIR = str(found[0].parent) if found else ""


def load_script(name: str) -> ModuleType:
    """Import an example script as a module (examples/ is not a package), to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dit_script_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    script = load_script("train_fmnist_dit")
    classifier_dir = tmp_path / "classifier"  # an untrained classifier: exercises the grid scoring
    classifier_dir.mkdir()
    save_file(build_classifier().state_dict(), classifier_dir / CLASSIFIER_CHECKPOINT_NAME)
    (classifier_dir / CLASSIFIER_CONFIG_NAME).write_text(json.dumps({"model": CLASSIFIER_CONFIG}))
    argv = ["--data", DATA_DIR, "--out", str(tmp_path), "--device", "cpu", "--minutes", "0.02",
            "--batch-size", "4", "--grid-steps", "1", "--grid-per-class", "1", "--log-every", "1",
            "--classifier", str(classifier_dir)]
    script.main(argv)

    model = load_embedded_model(directory=tmp_path)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    config = load_embedded_config(tmp_path)
    assert config["scheduler"]["num_train_timesteps"] == 1000 and config["null_class_id"] == NULL_CLASS_ID
    assert model.config.num_embeds_ada_norm == 10
    # The label table has the null-class row that guidance uses.
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11
    record = embedded_training_record(tmp_path)
    assert record["steps"] >= 1 and record["batch_size"] == 4 and record["weights"] == "EMA"
    assert record["command"].endswith(" ".join(argv)) and "train_fmnist_dit.py" in record["command"]
    assert record["final_loss"] > 0 and record["torch_version"] == torch.__version__
    assert 0.0 <= record["sample_grid"]["classifier_agreement"] <= 1.0
    assert record["wall_seconds"] >= record["train_seconds"]
    grid = Image.open(tmp_path / record["sample_grid"]["file"])
    assert grid.size[1] > grid.size[0] * 5  # 10 rows x 1 column
    # The checkpoint is in the size budget the package ships.
    assert (tmp_path / "fmnist_dit.safetensors").stat().st_size <= 20_000_000
    images = sample(model, torch.tensor([3]), steps=1, progress=False)
    assert images.shape == (1, 1, 32, 32) and torch.isfinite(images).all()


def test_classifier_script_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    script = load_script("train_fmnist_classifier")
    script.main(["--data", DATA_DIR, "--out", str(tmp_path), "--device", "cpu", "--minutes", "0.02",
                 "--batch-size", "16", "--eval-limit", "100", "--log-every", "1"])

    classifier = load_classifier(directory=tmp_path)
    record = classifier_record(tmp_path)
    assert 0.0 <= record["test_accuracy"] <= 1.0 and record["test_images"] == 100
    assert record["training"]["steps"] >= 1
    assert (tmp_path / "fmnist_classifier.safetensors").stat().st_size <= 2_000_000
    test_images, test_labels = data.load_fashion_mnist("test")
    with torch.no_grad():
        logits = classifier(data.to_model_space(test_images[:100]))
    accuracy = (logits.argmax(1) == test_labels[:100]).float().mean().item()
    assert accuracy == pytest.approx(record["test_accuracy"], abs=1e-6)
    json.dumps(record)  # plain JSON types only


def test_benchmark_arch_trains_resumably_and_writes_bf16_shards(tmp_path: Path) -> None:
    """The benchmark layout on a tiny config: a run split over two calls under one schedule, resumed from
    its state, writes loadable bf16 shards, the stored forward and a record of both calls."""
    from safetensors.torch import load_file

    script = load_script("train_fmnist_dit")
    out, state = tmp_path / "model", tmp_path / "state"
    argv = ["--arch", "benchmark", "--config-override", '{"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}',
            "--data", DATA_DIR, "--out", str(out), "--state", str(state), "--device", "cpu", "--minutes", "0.01",
            "--total-minutes", "0.05", "--batch-size", "4", "--grid-steps", "1", "--grid-per-class", "1",
            "--log-every", "1000"]
    script.main(argv)
    first = benchmark_training_record(out)
    assert first["steps"] >= 1 and not first["finished"] and len(first["calls"]) == 1
    assert (state / "train_state.pt").is_file()
    script.main(argv)
    second = benchmark_training_record(out)
    assert second["steps"] > first["steps"] and len(second["calls"]) == 2
    assert second["train_seconds"] > first["train_seconds"] and second["calls"][0] == first["calls"][0]

    config = benchmark_config(out)
    assert config["model"]["num_layers"] == 1 and config["null_class_id"] == NULL_CLASS_ID
    assert config["scheduler"]["beta_schedule"] == "linear" == second["beta_schedule"]  # DiT's betas
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert shards and all(t.dtype == torch.bfloat16 for shard in shards for t in load_file(shard).values())
    model = load_benchmark_model(out)
    with torch.no_grad():
        output = model(**reference_inputs()).sample
    assert torch.equal(output, load_file(out / REFERENCE_OUTPUT_NAME)["sample"])
    assert (out / second["sample_grid"]["file"]).is_file()
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        script.main(argv + ["--lr", "1e-3"])
