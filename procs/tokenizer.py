"""Tokenizer process: text (or chat messages) -> token ids, and worker token batches -> text deltas.

In:  GenerateReq / AbortReq / TokenizeReq from the gateway; TokenBatch from workers (and from the
     scheduler, for requests it failed before dispatch); PeerRestarted from a restarted peer.
Out: TokenizedReq / AbortReq to the scheduler; TextBatch / TokenizeReply to the gateway.

The logic (TokenizerService, TokenizerLoop) is minisgl/tokenizer/service.py; this is only its main.
"""

from __future__ import annotations

from transformers import AutoTokenizer

from minisgl import ipc
from minisgl.narration import relay_to_gateway
from minisgl.tokenizer.service import TokenizerLoop, TokenizerService


def main() -> None:
    cfg = ipc.become_child("tokenizer")
    relay_to_gateway(cfg, "tokenizer")
    TokenizerLoop(cfg, TokenizerService(cfg, AutoTokenizer.from_pretrained(cfg.model_path))).run()


if __name__ == "__main__":
    main()
