"""Student-stage settings refused before any work: the config validators and train()'s shard checks. No Ray."""

import pyarrow as pa
import pytest
import torch

from conftest import small_config
from distill_llm.config import ConfigError, load_config


def _kd(k: int, tail: bool) -> torch.Tensor:
    """The KD term and its gradient on real losses over k stored teacher logprobs."""
    from distill_llm.student.losses import KDSettings, distill_loss

    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    topk_ids = torch.stack([torch.randperm(20)[:k] for _ in range(6)])
    topk_logprobs = torch.log_softmax(torch.randn(6, 20), -1).gather(1, topk_ids).sort(-1, descending=True).values
    out = distill_loss(hidden, weight, torch.randint(0, 20, (6,)), topk_ids, topk_logprobs,
                       KDSettings(alpha=1.0, temperature=2.0, divergence="forward_kl", tail_bucket=tail))
    out["loss"].backward()
    return out["kd"].detach(), hidden.grad.abs().max()


def test_one_logprob_without_tail_bucket_is_refused_when_the_config_is_read():
    kd, grad = _kd(k=1, tail=False)  # the reason: one renormalised bucket, zero KD and zero gradient
    assert kd.item() == 0.0 and grad.item() == 0.0
    kd, grad = _kd(k=1, tail=True)
    assert kd.item() > 0 and grad.item() > 0, "the tail bucket gives k=1 a second bucket to learn from"

    with pytest.raises(ConfigError, match=r"train.alpha=0.5 with generate.top_k_logprobs=1 and "
                                          r"train.tail_bucket=false trains a KD term that is exactly zero"):
        load_config(None, ["generate.top_k_logprobs=1"])
    for fine in (["train.tail_bucket=true"], ["train.alpha=0"], ["generate.top_k_logprobs=2"]):
        load_config(None, ["generate.top_k_logprobs=1", *fine])


def _k1_shard_set(out, n: int = 8) -> str:
    """A real shard set (Parquet, commit records, manifest) holding one teacher logprob per token."""
    from distill_llm.corpus.schema import SCHEMA_VERSION, engine_output_schema
    from distill_llm.corpus.shards import ShardWriter, prepare_output, write_manifest

    run = {"schema_version": SCHEMA_VERSION, "teacher": {"model": "toy-teacher", "revision": None},
           "tokenizer_fingerprint": "abc", "prompts": {"source": "toy:train", "system_prompt": None},
           "sampling": {"temperature": 1.0, "seed": 0}, "top_k_logprobs": 1, "logprobs_dtype": "float16"}
    rows = [{"sample_id": f"p{i}-0", "prompt_id": f"p{i}", "sample_index": 0,
             "messages": [{"role": "user", "content": f"q{i}"}], "prompt_token_ids": [1, 2, 3],
             "completion_token_ids": [4, 5], "completion_text": "ab", "finish_reason": "stop", "answer": "1",
             "answer_correct": True, "topk_token_ids": [[4], [5]], "topk_logprobs": [[-0.1], [-0.2]],
             "skip_reason": None, "skip_detail": None} for i in range(n)]
    schema = engine_output_schema(1, "float16")
    table = pa.table({f.name: pa.array([r[f.name] for r in rows], type=f.type) for f in schema}, schema=schema)
    prepare_output(str(out), run, resume=True, overwrite=False)
    ShardWriter(str(out), 1, "float16", metadata=run).write([table])
    write_manifest(str(out))
    return str(out)


def test_shards_of_one_logprob_without_tail_bucket_are_refused_at_train_time(tmp_path):
    """The config says k=20 but data.shards were generated with k=1: train() refuses before Ray starts."""
    import ray

    from distill_llm.student.stage import train

    shards = _k1_shard_set(tmp_path / "k1")
    cfg = small_config(tmp_path, data={"shards": shards}, train={"verify_shards": "size"})
    assert cfg.generate.top_k_logprobs == 8 and cfg.train.alpha > 0 and not cfg.train.tail_bucket
    ray_before = ray.is_initialized()  # an earlier test of the session may have started Ray
    with pytest.raises(ConfigError, match=r"shards of top_k_logprobs=1 .* trains a KD term that is exactly zero"):
        train(cfg)
    assert ray.is_initialized() == ray_before, "refused before Ray starts"
    assert not (tmp_path / "train").exists(), "refused before the run folder is claimed"


@pytest.mark.slow
def test_an_export_no_node_can_hold_is_refused_before_training(ray_session, tmp_path):
    """The export task's memory is checked against the local Ray's nodes before any training step."""
    from distill_llm.student.stage import train

    shards = _k1_shard_set(tmp_path / "k1")
    cfg = small_config(tmp_path, data={"shards": shards}, train={"alpha": 0, "verify_shards": "size"},
                       student={"export_memory_gb": 100000})
    with pytest.raises(ConfigError, match=r"the export needs 100000.0 GiB of Ray memory on one node "
                                          r"\(student.export_memory_gb.*but the driver's node .* offers"):
        train(cfg)
    assert not list((tmp_path / "train").glob("*/checkpoint_*")), "refused before training"


def test_export_memory_takes_bytes_per_parameter_from_the_export_dtype(tmp_path):
    """Twice the weights in the export's dtype (torch's itemsize) + 1 GiB; a quantized base exports fp32."""
    from distill_llm.paths import resolve_model
    from distill_llm.student.stage import export_memory, student_dtype, student_parameters

    cfg = small_config(tmp_path)
    path = resolve_model(cfg.student.model)
    n = student_parameters(path, cfg)
    assert n > 0
    for dtype, size in (("float32", 4), ("bfloat16", 2), ("float16", 2), ("float64", 8)):
        assert export_memory(path, cfg, dtype) == 2 * n * size + 2**30, dtype
    assert student_dtype(path, cfg) in ("float32", "float16", "bfloat16", "float64")
