"""The tokenizer process's room: requests to token ids and token batches to streamed text.

`service.py`: TokenizerService (encoding, chat templates, limits, logprob text, usage) and TokenizerLoop
(its sockets: gateway in, scheduler and gateway out; aborts that overtake their request); `detokenize.py`:
incremental detokenization with stop strings, one RequestDetokenizer per request. procs/tokenizer.py is
the process's main.
"""
