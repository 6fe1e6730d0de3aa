"""The teacher stage's bookkeeping on a real engine: unseeded sampling, the engine settings in the run's
identity, the prompts line, and the manifest's count of rows whose answer passed."""

import json

import pyarrow.parquet as pq
import pytest

from conftest import small_config
from distill_llm.corpus.shards import ShardError, shard_files

pytestmark = pytest.mark.slow

SMALL = {"data": {"num_prompts": 6}, "generate": {"seed": "null", "max_new_tokens": 32, "top_k_logprobs": 4}}


def test_unseeded_run_records_its_engine_settings_and_refuses_others(ray_session, tmp_path, capfd):
    from distill_llm.teacher.stage import generate

    cfg = small_config(tmp_path, teacher={"engine_kwargs": "{logprobs_mode: raw_logprobs}"}, **SMALL)
    manifest = generate(cfg)
    assert "generate: 6 prompts from toy:train (0 skipped)" in capfd.readouterr().out
    run = json.loads((tmp_path / "shards" / "run.json").read_text())
    assert run["sampling"]["seed"] is None, "generate.seed: null samples without per-request seeds"
    assert run["teacher"]["max_model_len"] == 256 and run["teacher"]["engine_kwargs"] == {"logprobs_mode": "raw_logprobs"}
    assert manifest["totals"]["rows"] == 6 * 2 and manifest["totals"]["rejected"] == 0
    passed = sum(pq.read_table(f, columns=["answer_correct"]).column(0).to_pylist().count(True)
                 for f in shard_files(cfg.output.dir))
    assert manifest["totals"]["correct"] == passed > 0

    for teacher, diff in [({"max_model_len": 200}, "teacher.max_model_len: 256 -> 200"),
                          ({"engine_kwargs": "{enable_prefix_caching: false}"}, "teacher.engine_kwargs.logprobs_mode")]:
        with pytest.raises(ShardError, match=diff):
            generate(small_config(tmp_path, teacher=teacher, **SMALL))
