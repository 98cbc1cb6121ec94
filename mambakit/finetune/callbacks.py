"""Trainer callbacks: stop cleanly on SIGTERM/SIGUSR1 (preemption), log every record to
log.jsonl, TensorBoard, and an optional profile of a few steps (MAMBAKIT_PROFILE_STEPS)."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch

from mambakit.finetune import distributed
from mambakit.finetune.outputs import atomic_write_text


class PreemptionCallback:
    """SIGTERM/SIGUSR1 -> finish the current step, save a checkpoint, stop.

    The handler only sets a flag; at each step end the flag is agreed across ranks (a rank that
    got no signal still stops with the others). `stop_after_steps` simulates a signal (tests).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1), stop_after_steps=None):
        self.signals = signals
        self.received = None
        self.stopped = False
        self.stop_after_steps = stop_after_steps
        self._steps = 0
        self._previous = {}

    def install(self):
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)

    def uninstall(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum
        print(f"received signal {signal.Signals(signum).name}: will checkpoint after this step and stop", flush=True)

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                outer._steps += 1
                flag = outer.received is not None or (
                    outer.stop_after_steps is not None and outer._steps >= outer.stop_after_steps)
                d = distributed.process_group()
                if d is not None:
                    t = torch.tensor([1.0 if flag else 0.0],
                                     device="cuda" if d.get_backend() == "nccl" else "cpu")
                    d.all_reduce(t, op=d.ReduceOp.MAX)
                    flag = bool(t.item())
                if flag and state.global_step < state.max_steps:
                    outer.stopped = True
                    control.should_save = True
                    control.should_training_stop = True
                elif state.global_step >= state.max_steps:
                    control.should_save = True  # always a checkpoint at the end: resume after it is a no-op
                return control

        return _CB()


class JsonlLogCallback:
    """Appends every Trainer log record (with step and epoch) to output_dir/log.jsonl."""

    @staticmethod
    def callback(path: Path):
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                # a resumed run repeats the steps after its checkpoint: drop their old records
                if state.is_world_process_zero and path.exists():
                    keep = [l for l in path.read_text().splitlines()
                            if l.strip() and json.loads(l).get("step", 0) <= state.global_step]
                    atomic_write_text(path, "".join(l + "\n" for l in keep))

            def on_log(self, args, state, control, logs=None, **kwargs):
                if state.is_world_process_zero and logs:
                    rec = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
                    with open(path, "a") as f:
                        f.write(json.dumps(rec) + "\n")

        return _CB()


class ProfileCallback:
    """MAMBAKIT_PROFILE_STEPS=A-B: record optimizer steps A..B-1 with torch.profiler on every rank and
    write the busiest operators (CPU and GPU time) to output_dir/profile_rank{R}.txt. A debugging aid
    for slow steps (launch overhead, synchronisation, communication); unset, it does nothing."""

    @staticmethod
    def parse(spec: str | None) -> tuple[int, int] | None:
        if not spec:
            return None
        try:
            a, b = (int(x) for x in spec.split("-"))
        except ValueError:
            raise ValueError(f"MAMBAKIT_PROFILE_STEPS={spec!r}: expected FIRST-END, e.g. 10-13") from None
        if not 0 <= a < b:
            raise ValueError(f"MAMBAKIT_PROFILE_STEPS={spec!r}: expected 0 <= FIRST < END")
        return a, b

    @staticmethod
    def callback(out: Path, steps: tuple[int, int]):
        from transformers import TrainerCallback

        first, end = steps

        class _CB(TrainerCallback):
            prof = None
            t0 = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == first and self.prof is None:
                    acts = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        acts.append(torch.profiler.ProfilerActivity.CUDA)
                        torch.cuda.synchronize()
                    self.prof = torch.profiler.profile(activities=acts)
                    self.prof.start()
                    self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if self.prof is not None and state.global_step == end:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    wall = (time.perf_counter() - self.t0) / (end - first)
                    self.prof.stop()
                    rank = distributed.rank_and_world()[0]
                    ka = self.prof.key_averages()
                    gpu_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                    text = (f"steps {first}..{end - 1}: {wall * 1e3:.1f} ms per step (wall, rank {rank})\n\n"
                            f"by CPU time (with children):\n{ka.table(sort_by='cpu_time_total', row_limit=25)}\n"
                            f"by own {gpu_key.split('_')[1].upper()} time:\n{ka.table(sort_by=gpu_key, row_limit=25)}\n")
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"profile_rank{rank}.txt").write_text(text)
                    self.prof = None

        return _CB()


def tensorboard_callback(logdir: Path):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    class _TB(TensorBoardCallback):
        # transformers' callback writes model.config.to_json_string(); MambaConfig is a dataclass
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and self.tb_writer is None:
                self.tb_writer = SummaryWriter(log_dir=str(logdir))
                self.tb_writer.add_text("args", args.to_json_string())

    return _TB()
