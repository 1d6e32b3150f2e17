"""A stand-in for a vLLM server's ``POST /pooling`` (STEP pooling, task token_classify) on 127.0.0.1 for the
pooling-API client tests, and the tiny Qwen PRM checkpoint both the stub and the real-vLLM tests serve.

The stub computes what vLLM computes, with the transformers model: per prompt, the softmax of the PRM head at every
step-tag token. A script of actions, one per request (the last repeats), makes it fail on purpose."""

from __future__ import annotations

import pathlib
import threading

import torch

from family_testing import bpe_tokenizer
from json_http_stub import JsonHttpStub
from prmbench_fast.families.qwen_prm import Qwen2ForProcessRewardModel

TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def save_tiny_qwen_prm(folder: pathlib.Path, max_positions: int) -> pathlib.Path:
    """A random Qwen2ForProcessRewardModel and its tokenizer, saved in ``folder``. head_dim 32 (vLLM's CPU attention
    has no 16); initializer_range 0.2 spreads the step scores well away from the threshold 0.5."""
    corpus = [
        "Please reason step by step, and put your final answer within \x08oxed{}.",
        "What is 0.15 of 20? The rate is 15 percent. We get 3. So the answer is 3. Let x = 2y + 1, then solve.",
        "system user assistant\n",
    ] * 4
    tokenizer = bpe_tokenizer(corpus, pre_tokenizer="byte_level", vocab_size=320,
                              special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"],
                              chat_template=TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = Qwen2ForProcessRewardModel.config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=max_positions, initializer_range=0.2,
        architectures=["Qwen2ForProcessRewardModel"])
    Qwen2ForProcessRewardModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class PoolingStub(JsonHttpStub):
    """``POST /pooling`` answering with the model's step probabilities. ``script`` holds one action per request:
    ``"ok"``, ``("status", code)``, ``"malformed"`` (an answer without the prompts' data) or ``"drop"`` (the
    first prompt's last step left out). Every request body is recorded."""

    def __init__(self, model, tag_id: int, script=("ok",)):
        self.model, self.tag_id, self.script = model, tag_id, list(script)
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        super().__init__()

    def handle(self, handler, body) -> None:
        with self.lock:
            call = len(self.bodies)
            self.bodies.append({"path": handler.path, **body})
        action = self.script[min(call, len(self.script) - 1)]
        if handler.path != "/pooling":
            self.send(handler, 404, {"error": {"message": f"no route {handler.path}"}})
        elif isinstance(action, tuple):
            self.send(handler, action[1], {"error": {"message": f"scripted {action[1]}"}})
        elif action == "malformed":
            self.send(handler, 200, {"data": []})
        else:
            data = [self.probabilities(ids) for ids in body["input"]]
            if action == "drop":
                data[0] = data[0][:-1]
            self.send(handler, 200, {"data": [{"index": i, "data": d} for i, d in enumerate(data)]})

    def probabilities(self, ids: list[int]) -> list[list[float]]:
        tags = [p for p, token in enumerate(ids) if token == self.tag_id]
        with torch.no_grad():
            hidden = self.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, tags]
            return torch.softmax(self.model.score(hidden), dim=-1).tolist()
