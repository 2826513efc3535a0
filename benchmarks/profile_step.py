"""Where the time of one local step goes: a ``jax.profiler`` trace of the compiled client update
(one client, one AdamW step on 8 x 64 tokens, LoRA r=16 on query/value + classifier, MiniLM-L6),
each executed XLA operation put in a category by reading the optimized HLO.

Categories: ``dense matmul`` (dots with the frozen weights and the head), ``attention matmul``
(batched dots: QK^T and PV, forward and backward), ``LoRA matmul`` (a dot with a dimension of the
rank r), ``optimizer`` (operations emitted by the lines of the step that call the optimizer, apply
its update and mask it to the sketch: the AdamW update), ``elementwise``
(every other fusion: layer norm, softmax, GELU, masks, loss, residuals) and ``data movement``
(copy, transpose, gather, scatter, slices, concatenation). Times are the summed execution times
of XLA:CPU's operations over the repeats (both threads counted), so their shares, not their sum,
compare with the wall time; FLOPs are counted from the dots' shapes.

    python benchmarks/profile_step.py --json profile.json
"""

from __future__ import annotations

import collections
import functools
import json
import linecache
import math
import re
import tempfile
from pathlib import Path

import jax

from fedlora_jax.client import client_update, split_model
from fedlora_jax.data.builtin import minilm_path
from fedlora_jax.optim import OptimizerConfig, make_optimizer
from fedlora_jax.tasks import classification_loss
from common import best_time, jax_matmul_gflops, load_average, parser, write_rows  # benchmarks/
from vs_pytorch import BATCH, LABELS, RANK, SEQ, client_batches, jax_model

SKIPPED_EVENTS = ("ThreadpoolListener", "end: ", "ThunkExecutor")
CONTROL_FLOW = {"while", "conditional", "call"}  # their events enclose their bodies' operations
MOVEMENT = {"copy", "transpose", "gather", "scatter", "slice", "dynamic-slice",
            "dynamic-update-slice", "concatenate", "pad", "broadcast", "reshape", "bitcast",
            "copy-start", "copy-done", "iota"}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")
TABLE_ROW = re.compile(r"^(\d+) (.*)$")


class Hlo:
    """The optimized HLO of a compiled function: every instruction's opcode, output shape,
    called computation and source files (from the module's stack-frame tables)."""

    def __init__(self, text: str):
        self.inst, self.computations, tables = {}, collections.defaultdict(list), {}
        current = table = None
        for line in text.splitlines():
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                table = tables.setdefault(line, {})
            elif table is not None and (m := TABLE_ROW.match(line)):
                table[int(m.group(1))] = m.group(2)
            elif (m := COMPUTATION.match(line)) and " = " not in line:
                current, table = m.group(1), None
            elif m := INSTRUCTION.match(line):
                shapes = SHAPE.findall(m.group(2))
                self.inst[m.group(1)] = {
                    "opcode": m.group(3), "line": line,
                    "shape": tuple(int(d) for d in shapes[0].split(",") if d) if shapes else (),
                    "calls": (re.search(r"calls=%([\w.\-]+)", line) or [None, None])[1]}
                self.computations[current].append(m.group(1))
        self._tables = tables

    def frames(self, name: str) -> list[tuple[str, int]]:
        """``(file, line)`` of the Python stack that emitted instruction ``name``, innermost
        first (library frames are not recorded, only the project's and the caller's)."""
        frame = re.search(r"stack_frame_id=(\d+)", self.inst[name]["line"])
        frames, out, seen = self._tables.get("StackFrames", {}), [], set()
        frame = int(frame.group(1)) if frame else None
        while frame in frames and frame not in seen:
            seen.add(frame)
            location = self._tables["FileLocations"][
                int(re.search(r"file_location_id=(\d+)", frames[frame]).group(1))]
            file_id = int(re.search(r"file_name_id=(\d+)", location).group(1))
            out.append((self._tables["FileNames"][file_id].strip('"'),
                        int(re.search(r" line=(\d+)", location).group(1))))
            frame = int(re.search(r"parent_frame_id=(\d+)", frames[frame]).group(1))
        return out

    def body(self, name: str) -> list[str]:
        """The instruction itself, or the instructions of the computation it calls (a fusion)."""
        called = self.inst[name]["calls"]
        return self.computations[called] if called else [name]

    def dot_flops(self, name: str) -> float:
        """``2 x output elements x contracted size`` of a ``dot``."""
        line = self.inst[name]["line"]
        lhs = self.inst[re.search(r"dot\(%([\w.\-]+)", line).group(1)]["shape"]
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
        return 2.0 * math.prod(self.inst[name]["shape"]) * math.prod(
            lhs[int(i)] for i in contracting.split(",") if i)

    def operand_shapes(self, name: str) -> list[tuple[int, ...]]:
        args = self.inst[name]["line"].split("(", 1)[1].split(")")[0]
        return [self.inst[a]["shape"] for a in re.findall(r"%([\w.\-]+)", args) if a in self.inst]


def classify(hlo: Hlo, name: str, rank: int) -> tuple[str, float]:
    """The category of one executed operation and the FLOPs of its dots."""
    body = hlo.body(name)
    dots = [i for i in body if hlo.inst[i]["opcode"] in ("dot", "convolution")]
    if dots:
        flops = sum(hlo.dot_flops(i) for i in dots if hlo.inst[i]["opcode"] == "dot")
        shapes = [s for i in dots for s in [hlo.inst[i]["shape"], *hlo.operand_shapes(i)]]
        if any(rank in shape for shape in shapes):
            return "LoRA matmul", flops
        if any("lhs_batch_dims={" in hlo.inst[i]["line"] for i in dots):
            return "attention matmul", flops
        return "dense matmul", flops
    if any(_is_optimizer_line(*hlo.frames(i)[0]) for i in [name, *body] if hlo.frames(i)):
        return "optimizer", 0.0
    if all(hlo.inst[i]["opcode"] in MOVEMENT | {"parameter", "constant"} for i in body):
        return "data movement", 0.0
    return "elementwise", 0.0


def _is_optimizer_line(file: str, line: int) -> bool:
    """A line of the local step that updates the parameters: the optimizer's update,
    ``optax.apply_updates`` and the sketch mask on the update (``sketch.py``)."""
    text = linecache.getline(file, line)
    return file.endswith("sketch.py") or "optimizer.update(" in text or "apply_updates(" in text


def trace_op_times(fn, args, repeats: int) -> dict[str, float]:
    """Summed execution time (s) of every XLA operation over ``repeats`` calls of ``fn``."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(repeats):
                jax.block_until_ready(fn(*args))
        data = jax.profiler.ProfileData.from_file(str(next(Path(tmp).rglob("*.xplane.pb"))))
    times = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLA"):
                for event in line.events:
                    if not event.name.startswith(SKIPPED_EVENTS):
                        times[event.name] += event.duration_ns * 1e-9
    return dict(times)


def main(argv=None) -> list[dict]:
    args = parser(__doc__, "fewer repeats").parse_args(argv)
    repeats = 5 if args.quick else 20
    model = jax_model(str(minilm_path()))
    parts = split_model(model)
    vocab = json.loads((Path(minilm_path()) / "config.json").read_text())["vocab_size"]
    batches = {k: v[0] for k, v in client_batches(vocab, 1, 1).items()}  # H = 1
    step = jax.jit(functools.partial(client_update, parts.graphdef, parts.base,
                                     loss_fn=classification_loss,
                                     optimizer=make_optimizer(OptimizerConfig("adamw", 1e-4))))
    step_args = (parts.trainable, parts.sketch, batches)
    compiled = step.lower(*step_args).compile()
    hlo = Hlo(compiled.as_text())
    peak = jax_matmul_gflops()
    load = load_average()
    wall = best_time(lambda: step(*step_args), repeats)
    op_times = trace_op_times(step, step_args, repeats)
    seconds, flops = collections.Counter(), collections.Counter()
    unknown = 0.0
    for name, t in op_times.items():
        if name not in hlo.inst:
            unknown += t  # runtime events without an HLO instruction of their own
            continue
        if hlo.inst[name]["opcode"] in CONTROL_FLOW:
            continue
        category, f = classify(hlo, name, RANK)
        seconds[category] += t / repeats
        flops[category] += f
    total = sum(seconds.values())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f"one local step of MiniLM-L6 ({BATCH} x {SEQ} tokens, LoRA r={RANK}): wall "
          f"{wall * 1e3:.1f} ms (best of {repeats}), {cost['flops'] / 1e9:.2f} GFLOP by XLA's "
          f"count, {cost['flops'] / wall / 1e9:.1f} GFLOP/s; fp32 matmul peak {peak:.1f} GFLOP/s; "
          f"load {load:.1f}/{load_average():.1f}")
    print(f"{'category':<17} {'ms/step':>8} {'share':>6} {'GFLOP':>7} {'GFLOP/s':>8}")
    rows = []
    for category, t in seconds.most_common():
        rows.append({"category": category, "ms_per_step": t * 1e3, "share": t / total,
                     "gflop": flops[category] / 1e9,
                     "gflops": flops[category] / t / 1e9 if flops[category] else None})
        print(f"{category:<17} {t * 1e3:>8.2f} {t / total:>6.0%} {flops[category] / 1e9:>7.3f} "
              + (f"{flops[category] / t / 1e9:>8.1f}" if flops[category] else f"{'':>8}"))
    print(f"(operation time summed over threads: {total * 1e3:.1f} ms per step; "
          f"{unknown / repeats * 1e3:.2f} ms in events without an HLO instruction)")
    return write_rows(rows, args.json, wall_ms=wall * 1e3, step_gflop=cost["flops"] / 1e9,
                      peak_gflops=peak, load_average=[load, load_average()], labels=LABELS)


if __name__ == "__main__":
    main()
