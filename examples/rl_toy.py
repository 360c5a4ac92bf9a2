"""A tiny policy learns a verifiable task with lossgraph's policy gradient, on the CPU in a minute.

The task: given a prompt token x, answer with the token (x + 3) mod V at every one of the completion's
positions; the reward is the fraction of the completion's tokens that are right. A GRU of a few thousand
parameters starts at 1/V. Each step is GRPO, written out in plain PyTorch around one loss-graph call:

1. sample G completions for each of P prompts (temperature 1), keeping the sampling policy's log-probs;
2. score them, and normalize the rewards within each prompt's group: the advantages;
3. a few updates on the same rollouts: the graph's `policy_gradient` node (DAPO's clip-higher, GRPO's
   per-sequence mean) takes the logits, the sampled tokens as labels and `Rollout(advantages, old_logprobs)`.

    python examples/rl_toy.py                     # a live table of the reward, rising
    python examples/rl_toy.py --steps 20 --json out.json --quiet

docs/rl.md describes the kinds and the same loss inside TRL's GRPOTrainer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import lossgraph

VOCAB = 16
COMPLETION = 4
SHIFT = 3  # the right answer to prompt x is (x + SHIFT) mod VOCAB

GRAPH = f"""
version: 1
vocab_size: {VOCAB}
heads:
  next: {{offset: 1}}
sources:
  labels: {{type: labels, description: "the sampled completion tokens"}}
  rollouts: {{type: rollout, old_logprobs: true, description: "group-normalized advantages and sampling log-probs"}}
losses:
  pg:
    type: policy_gradient
    heads: [next]
    target: rollouts
    epsilon_low: 0.2
    epsilon_high: 0.28
    aggregation: sequence_mean
"""


class TinyPolicy(torch.nn.Module):
    """Embedding -> GRU -> logits: position t of [x, c1, ..., c_{L-1}] predicts completion token c_{t+1}."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, hidden)
        self.rnn = torch.nn.GRU(hidden, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None = None):
        hidden, state = self.rnn(self.embed(tokens), state)
        return self.head(hidden), state

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Completions [B, L] and the sampling policy's log-prob of each of their tokens [B, L]."""
        tokens, logprobs, state, current = [], [], None, prompts[:, None]
        for _ in range(COMPLETION):
            logits, state = self(current, state)
            distribution = torch.log_softmax(logits[:, -1].float(), dim=-1)
            current = torch.multinomial(distribution.exp(), 1, generator=generator)
            tokens.append(current[:, 0])
            logprobs.append(distribution.gather(-1, current)[:, 0])
        return torch.stack(tokens, 1), torch.stack(logprobs, 1)


def rewards(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """The verifier: the fraction of the completion's tokens that are (x + SHIFT) mod V."""
    return (completions == ((prompts + SHIFT) % VOCAB)[:, None]).float().mean(1)


def group_advantages(reward: torch.Tensor, group: int) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, over the group's standard deviation."""
    grouped = reward.view(-1, group)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)


def train(steps: int, prompts_per_step: int, group: int, updates: int, seed: int, show=None) -> list[dict]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = TinyPolicy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    graph = lossgraph.compile(lossgraph.loads(GRAPH))
    history = []
    for step in range(1, steps + 1):
        prompts = torch.randint(0, VOCAB, (prompts_per_step,), generator=generator).repeat_interleave(group)
        completions, old_logprobs = policy.sample(prompts, generator)
        reward = rewards(prompts, completions)
        rollout = lossgraph.Rollout(group_advantages(reward, group), old_logprobs=old_logprobs)
        # teacher forcing: the prompt and all but the last completion token predict the completion
        inputs = torch.cat([prompts[:, None], completions[:, :-1]], 1)
        for _ in range(updates):
            logits, _ = policy(inputs)
            out = graph({"next": logits}, labels=completions, teachers={"rollouts": rollout})
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        history.append({"step": step, "reward": reward.mean().item(), "loss": out.loss.item()})
        if show is not None:
            show(history)
    return history


class LiveTable:
    """A progress bar and the reward of the last steps, redrawn as training goes."""

    def __init__(self, console: Console, steps: int, rows: int = 12):
        self.rows = rows
        self.progress = Progress(
            TextColumn("GRPO on a toy task"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self.task = self.progress.add_task("steps", total=steps)
        self.history: list[dict] = []
        self.live = Live(get_renderable=self._render, console=console, refresh_per_second=4)

    def _render(self) -> Group:
        table = Table(title=f"reward by step (chance: {1 / VOCAB:.2f})", title_justify="left")
        for column in ("step", "reward", "", "loss"):
            table.add_column(column, justify="right" if column != "" else "left")
        for row in self.history[-self.rows :]:
            bar = "█" * round(20 * row["reward"])
            table.add_row(str(row["step"]), f"{row['reward']:.3f}", bar, f"{row['loss']:+.4f}")
        return Group(self.progress, table)

    def __call__(self, history: list[dict]) -> None:
        self.history = list(history)
        self.progress.update(self.task, completed=len(history))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (GRPO's group)")
    parser.add_argument("--updates", type=int, default=2, help="updates per batch of rollouts (off-policy after 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the reward curve and the run time here")
    parser.add_argument("--quiet", action="store_true", help="no live table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    console = Console()
    start = time.perf_counter()
    if args.quiet:
        history = train(args.steps, args.prompts, args.group, args.updates, args.seed)
    else:
        table = LiveTable(console, args.steps)
        with table.live:
            history = train(args.steps, args.prompts, args.group, args.updates, args.seed, show=table)
    seconds = time.perf_counter() - start
    window = max(1, len(history) // 5)
    first = sum(row["reward"] for row in history[:window]) / window
    last = sum(row["reward"] for row in history[-window:]) / window
    if not args.quiet and not console.is_terminal:
        console.line()  # a live display leaves no line break behind when it writes to a file or a pipe
    every = max(1, len(history) // 10)
    curve = " ".join(f"{row['reward']:.2f}" for row in history[every - 1 :: every])
    console.print(f"reward every {every} steps: {curve}")
    console.print(
        f"reward rose from {first:.3f} to {last:.3f} (mean of the first and last {window} steps) in {seconds:.1f} s"
    )
    summary = {"seconds": seconds, "first_reward": first, "last_reward": last, "history": history}
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
