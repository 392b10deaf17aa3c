"""Prompts and labels: the one home of the paper's prompt formats.

    robot:  [BOS] <VLA_PROMPT> What action should the robot take to {instruction}? {action tokens} [EOS]
    VL:     [BOS] <VLM_PROMPT> {question} {answer} [EOS]

Labels are -100 everywhere except the answer tokens and EOS, so the loss is
on actions (or answers) only. Image tokens are spliced in after BOS by the
model; they never appear here. The policy builds its prompt with the same
`prompt_ids` so that inference sees exactly what training saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_scale.errors import DataError
from vla_scale.models.loading import VLA_PROMPT, VLM_PROMPT
from vla_scale.models.vla import IGNORE_INDEX

ROBOT_TEMPLATE = VLA_PROMPT + " What action should the robot take to {instruction}?"
VL_TEMPLATE = VLM_PROMPT + " {question}"


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]


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

    def robot_prompt(self, instruction: str) -> str:
        instruction = instruction.strip().rstrip("?.! ")
        return ROBOT_TEMPLATE.format(instruction=instruction[:1].lower() + instruction[1:])

    def build_robot(self, instruction: str, normalized_action: np.ndarray) -> TokenizedSample:
        return self._assemble(self.prompt_ids(self.robot_prompt(instruction)),
                              list(self.action_tokenizer.encode(normalized_action)))

    def build_vl(self, question: str, answer: str) -> TokenizedSample:
        return self.build_vl_turns([{"question": question, "answer": answer}])

    def build_vl_turns(self, turns: list[dict[str, str]]) -> TokenizedSample:
        """Multi-turn VL: every answer (and the final EOS) is labelled, every question is not."""
        ids = self.prompt_ids(VL_TEMPLATE.format(question=turns[0]["question"].strip()))
        labels = [IGNORE_INDEX] * len(ids)
        for k, turn in enumerate(turns):
            if k:
                q = self.text_ids(" " + turn["question"].strip())
                ids += q
                labels += [IGNORE_INDEX] * len(q)
            a = self.text_ids(" " + turn["answer"].strip())
            ids += a
            labels += a
        return self._check(TokenizedSample(ids + [self.tokenizer.eos_token_id],
                                           labels + [self.tokenizer.eos_token_id]))

    def _assemble(self, prompt: list[int], answer: list[int]) -> TokenizedSample:
        ids = prompt + answer + [self.tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * len(prompt) + answer + [self.tokenizer.eos_token_id]
        return self._check(TokenizedSample(ids, labels))

    def _check(self, sample: TokenizedSample) -> TokenizedSample:
        if len(sample.input_ids) > self.max_length:
            raise DataError(f"sample has {len(sample.input_ids)} text tokens, more than "
                            f"data.max_length={self.max_length}")
        return sample
