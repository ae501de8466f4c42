"""The compiled decode step (`--cuda-graphs`) on a whole run's shapes and the replica's refresh under FSDP2. On the CPU
the decode step compiles with GRPO_COMPILE_BACKEND=eager (or "recording", eager that notes each graph's shape): the
same dynamo guards, graphs and static caches as CUDA graphs, without a GPU (tests/test_cuda.py runs the shape schedule
with CUDA graphs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import generation
import loading
import test_train_math
import train_math
from tiny import tiny_model

T, EOS = 16, list(range(1, 20))  # EOS common enough that most calls stop early
# a GSM8K run's generate calls on one rank, scaled down: (rows, prompt length, temperature, seed). Two training steps
# of 32 rows at T 0.7 over three prompt lengths, then an eval at two prompt lengths: batches of 64 and the 37-row
# tail, greedy and sampled: eleven (rows, P + T, temperature) shapes, past dynamo's recompile limit of 8 unbucketed.
SCHEDULE = ([(32, P, 0.7, step) for step in range(2) for P in (40, 150, 260)]
            + [(n, P, temp, 99) for P in (150, 260) for temp in (0.0, 0.7) for n in (64, 37)])
BUCKETS = {(32, 256), (32, 512), (64, 256), (64, 512)}  # rows up to a power of two, P + T up to a multiple of 256
KV_BYTES = 2 * 2 * 2 * 8 * 4  # per row and position: layers x (keys, values) x KV heads x head dim x float32
GRAPHS = []  # (rows, cache length) of each graph the "recording" backend compiled


@torch._dynamo.register_backend
def recording(gm, example_inputs):
    """The eager backend, noting each graph's shape: that of its one 2-D int64 input, the attention mask."""
    GRAPHS.extend(tuple(x.shape) for x in example_inputs if x.dtype == torch.long and x.dim() == 2)
    return gm.forward


def prompts(n: int, P: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, P) left-padded ids and mask, each row padded differently."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(P)[None] >= (torch.arange(n)[:, None] * 7) % (P // 2)).long()
    return (torch.randint(6, 48, (n, P), generator=g) * mask).to(device), mask.to(device)


def generate_both(model, n: int, P: int, temperature: float, seed: int, device):
    """(compiled, eager) `generate` results of one call, the same prompts and sampling seed."""
    ids, mask = prompts(n, P, seed * 1000 + P, device)
    out = []
    for compiled in (True, False):
        model.grpo_cuda_graphs = compiled
        out.append(generation.generate(model, ids, mask, max_new_tokens=T, eos_token_ids=EOS, pad_token_id=0,
                                       temperature=temperature,
                                       generator=torch.Generator(device).manual_seed(seed)))
    return out


def check_shape_schedule(monkeypatch, device):
    """SCHEDULE through `generate`: no recompile-limit failure (fullgraph would raise it), one graph per bucket, one
    KV buffer, the largest bucket's, and every call's tokens equal to eager decoding's."""
    monkeypatch.setattr(generation, "compiled_graphs", 0)
    torch._dynamo.reset()
    counters.clear()
    GRAPHS.clear()
    model = generation.rollout_model(tiny_model("qwen2").to(device), torch.float32, cuda_graphs=True)
    lengths = []
    for n, P, temperature, seed in SCHEDULE:
        (ours, ours_mask), (eager, eager_mask) = generate_both(model, n, P, temperature, seed, device)
        assert torch.equal(ours, eager) and torch.equal(ours_mask, eager_mask), (n, P, temperature)
        lengths.append(eager.shape[1])
    assert counters["stats"]["unique_graphs"] == len(BUCKETS)
    assert sum(t.nbytes for kv in model.grpo_decode_pool["buffers"] for t in kv) == 64 * 512 * KV_BYTES
    assert min(lengths) < T  # calls stopped early (padding rows must not hold them back)


def test_compiled_decode_runs_a_gsm8k_shape_schedule(monkeypatch):
    monkeypatch.setenv("GRPO_COMPILE_BACKEND", "recording")
    check_shape_schedule(monkeypatch, torch.device("cpu"))
    assert sorted(GRAPHS) == sorted(BUCKETS)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_compiled_decode_is_one_graph_for_greedy_and_sampled(monkeypatch, arch):
    """Other architectures: the decode step traces as one graph (fullgraph), shared by greedy and sampled calls, and
    decodes what eager decoding does."""
    monkeypatch.setenv("GRPO_COMPILE_BACKEND", "eager")
    monkeypatch.setattr(generation, "compiled_graphs", 0)
    torch._dynamo.reset()
    counters.clear()
    model = generation.rollout_model(tiny_model(arch), torch.float32, cuda_graphs=True)
    for temperature in (0.0, 0.7):
        (ours, _), (eager, _) = generate_both(model, 6, 9, temperature, 5, torch.device("cpu"))
        assert torch.equal(ours, eager), temperature
    assert counters["stats"]["unique_graphs"] == 1


def test_shapes_past_the_graph_bound_decode_eagerly(monkeypatch, capsys):
    """Past DECODE_GRAPHS graphs a new shape decodes eagerly, with a warning, instead of failing the run; the shapes
    compiled before keep their graphs."""
    monkeypatch.setenv("GRPO_COMPILE_BACKEND", "eager")
    monkeypatch.setattr(generation, "compiled_graphs", 0)
    monkeypatch.setattr(generation, "DECODE_GRAPHS", 1)
    torch._dynamo.reset()
    counters.clear()
    model = generation.rollout_model(tiny_model("qwen2"), torch.float32, cuda_graphs=True)
    for n in (4, 8, 4):  # two row buckets; one graph allowed
        (ours, _), (eager, _) = generate_both(model, n, 9, 0.7, 5, torch.device("cpu"))
        assert torch.equal(ours, eager), n
    assert counters["stats"]["unique_graphs"] == 1
    assert capsys.readouterr().out.count("warning: decode shape 8 x 256 would be compiled graph 2") == 1


def test_cuda_graphs_flag_on_the_cpu_gives_the_eager_run(small_toy, tmp_path, monkeypatch, capsys):
    """train_math with --cuda-graphs compiled on the CPU (GRPO_COMPILE_BACKEND=eager): rollouts (12 rows, padded to
    16), evals (greedy and sampled, 8 rows in batches of 3: a tail of 2) and so every metric equal the eager run's;
    the start line says what compiles, and the KV buffer is sized once, at start, for the training rollouts."""
    metrics = []
    for graphs in (False, True):
        if graphs:
            monkeypatch.setenv("GRPO_COMPILE_BACKEND", "eager")
        out = tmp_path / str(graphs)
        args = test_train_math.toy_args(small_toy, out, "--prompts-per-step", "3", "--gen-batch-size", "3",
                                        *["--cuda-graphs"] * graphs)
        train_math.main(loading.parse_config(train_math.Config, args, train_math.PRESETS))
        metrics.append([{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                        for line in (out / "metrics.jsonl").read_text().splitlines()])
    # the sampler's log-probs differ in the last bits (padded rows change the matmul blocking), not the tokens
    sampler = [[{k: r.pop(k) for k in list(r) if k.startswith("sampler/")} for r in run] for run in metrics]
    assert metrics[1] == metrics[0] and len(metrics[0]) == 4
    for eager, compiled in zip(*sampler):
        assert eager.keys() == compiled.keys() and all(abs(eager[k] - compiled[k]) < 1e-5 for k in eager), (eager, compiled)
    out = capsys.readouterr().out
    assert "compiled decode (torch.compile backend eager;" in out
    assert out.count("decode cache: ") == 1 and "(16 rows x 256 positions)" in out  # sized at start, never regrown


def test_tensor_temperature_samples_the_same_tokens():
    """The compiled step's sampling (temperature a 0-d tensor, greedy picked by torch.where) == the float path, token
    for token, at Qwen2.5's vocabulary, with and without top-p/top-k."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 151_936, generator=g) * 3
    uniforms = torch.rand(16, 1, dtype=torch.float64, generator=g)
    for temperature, top_p, top_k in ((0.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 1.0, 0), (1.3, 1.0, 0), (0.7, 0.9, 50)):
        expected = generation.sample_token(logits, temperature, top_p, top_k, uniforms=uniforms)
        ours = generation.sample_token(logits, torch.tensor(temperature), top_p, top_k, uniforms=uniforms)
        assert torch.equal(ours, expected), (temperature, top_p, top_k)


def test_replica_refresh_gathers_once_per_fsdp_unit(tmp_path):
    """2 ranks (gloo): after an optimizer step, one refresh runs one all-gather per FSDP unit (2 blocks + the root)
    and no other collective, leaves the policy sharded, and the replica equals every parameter's full tensor rounded
    once to its dtype; bf16 all-gathers into an fp32 replica would round twice: its 27 parameters are gathered again."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_DEVICE": "cpu"}
    worker = Path(__file__).parent / "replica_worker.py"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                    str(worker), str(tmp_path)], check=True, env=env, timeout=300)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        gathers = {"untied float32": 3, "tied bfloat16": 3, "untied bfloat16, bf16 gathers": 3,
                   "untied float32, bf16 gathers": 3 + 27}
        assert result.keys() == gathers.keys()
        for case, r in result.items():
            assert r["units"] == 3 and r["collectives"] == {"all_gather": gathers[case]}, (rank, case, r)
            assert r["exact"] and r["resharded"], (rank, case, r)
