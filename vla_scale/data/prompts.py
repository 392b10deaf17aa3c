"""Prompts and labels: the one home of the paper's prompt formats.

    robot:  [BOS] <VLA_PROMPT> What action should the robot take to {instruction}? {action tokens} [EOS]
    VL:     [BOS] <VLM_PROMPT> {question} {answer} [EOS]

Labels are -100 everywhere except the answer tokens and EOS, so the loss is
on actions (or answers) only. The labels also say where the prompt ends: for
a PaliGemma source the image and every position before the first answer
token attend both ways (prefix-LM). Image tokens are placed by the model, as
the source family does (`vla_scale.models.vla.SequenceLayout`); they never
appear here. The policy builds its prompt with the same
`prompt_ids` so that inference sees exactly what training saw.

A sample longer than `max_length` is, per `data.overlong`: an error;
truncated (whole later turns are dropped first, then the end of the first
question, so the first answer stays whole; only an answer that alone does not
fit is cut, and then without EOS, since it did not end); or dropped (BOS
alone, no answer tokens: it keeps its batch slot and adds nothing to the loss,
whose divisor is the count of answer tokens). A robot action is never cut.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_scale.errors import ConfigError, DataError
from vla_scale.models.loading import VLA_PROMPT, VLM_PROMPT
from vla_scale.models.vla import IGNORE_INDEX

ROBOT_TEMPLATE = VLA_PROMPT + " What action should the robot take to {instruction}?"
VL_TEMPLATE = VLM_PROMPT + " {question}"


OVERLONG = ("truncate", "drop", "error")


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    # Label positions whose token accuracy counts: for actions, where the grammar leaves a choice
    # (digits, free signs), never forced characters or EOS; None: every answer token.
    choice: list[bool] | None = None
    truncated: bool = False
    dropped: bool = False


class PromptBuilder:
    def __init__(self, tokenizer: Any, action_tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.action_tokenizer = action_tokenizer
        self.max_length = max_length

    def prompt_ids(self, text: str) -> list[int]:
        """BOS + the prompt's tokens (what the policy feeds before decoding).

        The leading prompt tag is the only special token: the rest is the user's
        text, and a "</s>" or "<VLA_PROMPT>" written in an instruction or question
        is tokenized as characters, never as the special token.
        """
        tag = next((t for t in (VLA_PROMPT, VLM_PROMPT) if text.startswith(t)), "")
        head = [self.tokenizer.convert_tokens_to_ids(tag)] if tag else []
        return [self.tokenizer.bos_token_id] + head + self.text_ids(text[len(tag):])

    def text_ids(self, text: str) -> list[int]:
        """Token ids of user text, special-token strings included as plain text."""
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def robot_prompt(self, instruction: str, state: str | None = None) -> str:
        """The robot prompt; `state` (data.state: text, `vla_scale.data.state.state_text`) follows the
        question, pi0.5-style: "... take to open the drawer? State: 12 200 45." """
        instruction = instruction.strip().rstrip("?.! ")
        text = ROBOT_TEMPLATE.format(instruction=instruction[:1].lower() + instruction[1:])
        return text if state is None else f"{text} State: {state}."

    def build_robot(self, instruction: str, normalized_action: np.ndarray, overlong: str = "error",
                    valid_steps: int | None = None, state: str | None = None) -> TokenizedSample:
        """`valid_steps`: for a (T, D) chunk padded past its episode's end, how many leading steps are
        real; the tokens of the padded steps get no label (no loss, no accuracy). EOS keeps its label:
        the grammar forces it after T steps whatever they hold."""
        prompt = self.prompt_ids(self.robot_prompt(instruction, state))
        answer = list(self.action_tokenizer.encode(normalized_action))
        sample = self._fit([prompt, answer], overlong, robot=True)
        # A robot action is never cut: it is whole (ending in EOS), or the sample was dropped.
        answer_at = next((i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX), len(sample.labels))
        action = np.asarray(normalized_action)
        grammar = self.action_tokenizer.grammar(self.tokenizer.eos_token_id,
                                                chunk=action.shape[0] if action.ndim == 2 else None)
        sample.choice = [False] * answer_at + grammar.choice_positions(sample.labels[answer_at:])
        if valid_steps is not None and action.ndim == 2 and valid_steps < action.shape[0] and not sample.dropped:
            if valid_steps < 1:
                raise DataError(f"an action chunk needs at least one real step, got valid_steps={valid_steps}")
            real = self.action_tokenizer.encode(action[:valid_steps])
            # Every piece belongs to one value (a separator travels with the next value's sign), so the
            # tokens of the first k steps are a prefix of the chunk's tokens.
            if answer[:len(real)] != list(real):
                raise AssertionError("action tokens of a chunk's first steps are not a prefix of the chunk's")
            for i in range(answer_at + len(real), answer_at + len(answer)):
                sample.labels[i] = IGNORE_INDEX
                sample.choice[i] = False
        return sample

    def build_vl(self, question: str, answer: str, overlong: str = "error") -> TokenizedSample:
        return self.build_vl_turns([{"question": question, "answer": answer}], overlong)

    def build_vl_turns(self, turns: list[dict[str, str]], overlong: str = "error") -> TokenizedSample:
        """Multi-turn VL: every answer (and the final EOS) is labelled, every question is not."""
        segments = [self.prompt_ids(VL_TEMPLATE.format(question=turns[0]["question"].strip()))]
        for k, turn in enumerate(turns):
            if k:
                segments.append(self.text_ids(" " + turn["question"].strip()))
            segments.append(self.text_ids(" " + turn["answer"].strip()))
        return self._fit(segments, overlong)

    def check_robot_fits(self, action_shape: tuple[int, ...], state: str | None = None) -> None:
        """ConfigError at start when max_length cannot hold a robot prompt (with `state` text, the longest
        the state can write) and a whole action."""
        # Negative with every decimal nonzero: the longest text either string style writes for a value.
        worst = np.full(action_shape, -0.123456789)
        need = len(self.prompt_ids(self.robot_prompt("x", state))) + len(self.action_tokenizer.encode(worst)) + 1
        if need > self.max_length:
            raise ConfigError(f"data.max_length={self.max_length} cannot hold a robot sample: a one-word instruction "
                              f"and a whole action take {need} tokens; raise data.max_length to at least {need}")

    def _fit(self, segments: list[list[int]], overlong: str, robot: bool = False) -> TokenizedSample:
        """Prompt, answer, [question, answer]... + EOS as ids and labels, within max_length per `overlong`."""
        limit = self.max_length
        total = sum(map(len, segments)) + 1
        if total <= limit:
            return self._join(segments, eos=True)
        kind = "robot" if robot else "vision-language"
        if overlong not in OVERLONG:
            raise ConfigError(f"data.overlong={overlong!r} is not one of {list(OVERLONG)}")
        if overlong == "error":
            raise DataError(f"{kind} sample has {total} text tokens, more than data.max_length={limit}; raise "
                            f"data.max_length, or set data.overlong to 'truncate' or 'drop'")
        if overlong == "drop":
            return TokenizedSample([self.tokenizer.bos_token_id], [IGNORE_INDEX], dropped=True)
        turns = 1 + (len(segments) - 2) // 2  # segments: prompt, answer, then (question, answer) pairs
        while turns > 1 and sum(map(len, segments[:2 * turns])) + 1 > limit:
            turns -= 1
        if turns > 1 or len(segments[0]) + len(segments[1]) + 1 <= limit:
            return self._join(segments[:2 * turns], eos=True, truncated=True)
        prompt, answer = segments[0], segments[1]
        head = 2  # BOS and the prompt tag: the least of a prompt
        if head + len(answer) + 1 <= limit:
            return self._join([prompt[:limit - len(answer) - 1], answer], eos=True, truncated=True)
        if robot:
            raise DataError(f"robot sample: its action alone takes {len(answer)} tokens, more than "
                            f"data.max_length={limit} allows with its prompt; raise data.max_length")
        keep = min(len(prompt), max(head, limit // 2))
        return self._join([prompt[:keep], answer[:limit - keep]], eos=False, truncated=True)

    def _join(self, segments: list[list[int]], eos: bool, truncated: bool = False) -> TokenizedSample:
        ids, labels = [], []
        for k, seg in enumerate(segments):
            ids += seg
            labels += seg if k % 2 else [IGNORE_INDEX] * len(seg)  # odd segments are answers
        if eos:
            ids.append(self.tokenizer.eos_token_id)
            labels.append(self.tokenizer.eos_token_id)
        return TokenizedSample(ids, labels, truncated=truncated)
