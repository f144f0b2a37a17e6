"""A pruned model measured against the full one, with or without labels.

Accuracy alone hides change: a pruned model can keep its accuracy while many answers
flip (Dutta et al., NeurIPS 2024, "Accuracy is not all you need"). So, on held-out
examples that no calibration sample overlaps, the full model's next-token distribution
over the answer tokens is kept, teacher-forced on the example's reference answer where
it has one and otherwise on the full model's own greedy answer, and each pruned model
is compared with it token by token:

- KL(full || pruned): mean, median, 99th and 99.9th percentile over the answer tokens
  (llama.cpp's `--kl-divergence` figures);
- "same top": the share of answer tokens whose most likely next token is unchanged;
- "same answer": the share of greedy answers identical to the full model's;
- with labels (answers exact match can score): accuracy, and flips, the answers that
  went right -> wrong and wrong -> right.

None of it needs a label except accuracy and flips, so it measures any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .answers import ask
from .data import Example, batches
from .progress import Progress



def normalise(text: str) -> str:
    """Lower case, single spaces, no trailing full stop: how exact match reads an answer."""
    return " ".join(text.lower().replace(" ,", ",").split()).strip(" .")


def exact_match(answer: str, expected: str) -> bool:
    return normalise(answer) == normalise(expected)


@dataclass
class Reference:
    """What the full model does on the held-out examples, kept to compare pruned models with.

    `forced` are the examples as teacher-forced (the answer is the reference where the
    example had one, else the full model's greedy answer); `logits` one float32 CPU
    tensor per example, (answer tokens, vocabulary); `answers` the full model's greedy
    answers; `expected` the reference answers ("" where there was none).
    """

    forced: list[Example]
    logits: list[torch.Tensor]
    answers: list[str]
    expected: list[str]

    @property
    def from_references(self) -> int:
        return sum(1 for e in self.expected if e.strip())


def full_reference(loaded, examples: list[Example], batch_size: int = 16, max_new_tokens: int = 20,
                   progress: Progress | None = None) -> Reference:
    """Run the full (unpruned) model on the held-out examples; call before pruning."""
    if not examples:
        raise ValueError("quality needs at least one held-out example")
    answers = greedy_answers(loaded, examples, batch_size, max_new_tokens, progress)
    forced = [Example(e.image, e.question, e.answer if e.answer.strip() else a) for e, a in zip(examples, answers)]
    return Reference(forced, answer_logits(loaded, forced, batch_size), answers, [e.answer for e in examples])


def greedy_answers(loaded, examples: list[Example], batch_size: int = 16, max_new_tokens: int = 20,
                   progress: Progress | None = None) -> list[str]:
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        answers += ask(loaded, [e.image for e in chunk], [e.question for e in chunk], max_new_tokens)
        if progress:
            progress("quality: answers", len(answers), len(examples))
    return answers


@torch.no_grad()
def answer_logits(loaded, examples: list[Example], batch_size: int = 16) -> list[torch.Tensor]:
    """The next-token logits at every answer position, teacher-forced.

    The positions are the ones the model's own loss scores: for a decoder-only language
    model the logit before each labelled token (the last len(labels) positions, shifted
    by one), for an encoder-decoder the decoder's logit at each labelled token.
    """
    out = []
    for batch in batches(loaded, examples, batch_size):
        logits = loaded.model(**batch, use_cache=False).logits.float()
        labels = batch["labels"]
        if loaded.decoder_only:
            logits, labels = logits[:, -labels.shape[1]:][:, :-1], labels[:, 1:]
        for row in range(labels.shape[0]):
            out.append(logits[row][labels[row] != -100].cpu())
    return out


def percentile(values: torch.Tensor, q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    return torch.quantile(values, q / 100).item()


@torch.no_grad()
def against_full(loaded, reference: Reference, labelled: bool = False, batch_size: int = 16,
                 max_new_tokens: int = 20, progress: Progress | None = None) -> dict:
    """The (pruned) loaded model against the full model's reference: the report's `quality`."""
    pruned = answer_logits(loaded, reference.forced, batch_size)
    kl, same_top = [], []
    for full, mine in zip(reference.logits, pruned):
        # in float64: the divergence of a lightly pruned model is a small difference of large terms
        full, mine = torch.log_softmax(full.double(), -1), torch.log_softmax(mine.double(), -1)
        kl.append((full.exp() * (full - mine)).sum(-1))
        same_top.append(full.argmax(-1) == mine.argmax(-1))
    kl, same_top = torch.cat(kl), torch.cat(same_top)
    answers = greedy_answers(loaded, reference.forced, batch_size, max_new_tokens, progress)
    same = sum(exact_match(a, b) for a, b in zip(answers, reference.answers))
    n = len(answers)
    result = {
        "n": n,
        "tokens": int(kl.numel()),
        "teacher_forced_on": f"{reference.from_references} reference answers, "
                             f"{n - reference.from_references} of the full model's greedy answers",
        "kl_mean": kl.mean().item(),
        "kl_median": percentile(kl, 50),
        "kl_p99": percentile(kl, 99),
        "kl_p999": percentile(kl, 99.9),
        "same_top": same_top.double().mean().item(),
        "same_answer": same / n,
    }
    if labelled and reference.from_references:
        result.update(labelled_counts(reference.answers, answers, reference.expected))
    return result


def labelled_counts(full_answers: list[str], answers: list[str], expected: list[str]) -> dict:
    """Accuracy of both models and the answers that flipped between them, over the
    examples that have a reference answer."""
    scored = [i for i, e in enumerate(expected) if e.strip()]
    full_right = [exact_match(full_answers[i], expected[i]) for i in scored]
    right = [exact_match(answers[i], expected[i]) for i in scored]
    return {
        "accuracy": sum(right) / len(right),
        "full_accuracy": sum(full_right) / len(full_right),
        "flips": {"right_to_wrong": sum(f and not r for f, r in zip(full_right, right)),
                  "wrong_to_right": sum(r and not f for f, r in zip(full_right, right))},
    }


def summary(quality: dict) -> str:
    """One line for a status bar."""
    text = (f"on {quality['n']} held-out examples: KL mean {quality['kl_mean']:.4f}, "
            f"p99 {quality['kl_p99']:.3f}; same top {quality['same_top']:.1%}; "
            f"same answer {quality['same_answer']:.1%}")
    if "accuracy" in quality:
        flips = quality["flips"]
        text += (f"; accuracy {quality['accuracy']:.1%} (full {quality['full_accuracy']:.1%}), "
                 f"flips right→wrong {flips['right_to_wrong']}, wrong→right {flips['wrong_to_right']}")
    return text
