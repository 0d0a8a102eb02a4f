"""SFT data: assistant-only loss masks (LongCat-style and HF templates), packing isolation, resume."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from data_tools.chat_format import HFChatTemplate, tokenize_hf, tokenize_longcat
from data_tools.sft import preprocess_sft
from longcat_megatron.data.config import DataConfig
from longcat_megatron.data.sft import build_sft_iterators

EOS = 2
SEQ = 128
WORDS = "alpha beta gamma delta print return value list dict error file open close read write".split()

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
    {"role": "tool", "name": "add", "content": "4"},
    {"role": "assistant", "content": "It is four."},
    {"role": "user", "content": "And times three?"},
    {"role": "assistant", "content": "Twelve."},
]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def masked_runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_longcat_template_masks_exactly_the_assistant_turns(tokenizer):
    chat = tokenize_longcat(tokenizer, CONVERSATION, EOS)
    runs = masked_runs(chat.ids, chat.loss_mask)
    assert len(runs) == 3 and all(r[-1] == EOS for r in runs)
    texts = [tokenizer.decode(r[:-1], skip_special_tokens=False) for r in runs]
    assert texts[0].startswith("<longcat_tool_call>") and '"name": "add"' in texts[0]
    assert texts[1:] == ["It is four.", "Twelve."]
    prompt = tokenizer.decode([i for i, m in zip(chat.ids, chat.loss_mask) if not m])
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] in prompt
    assert "four" not in prompt and "Twelve" not in prompt
    assert prompt.startswith("SYSTEM:You are terse.\n[Round 0] USER:What is two plus two? ASSISTANT:")


def test_hf_template_masks_exactly_the_assistant_turns(tokenizer):
    special = {"eos_token": "<|endoftext|>", "bos_token": "<|bos|>", "pad_token": "<|pad|>"}
    messages = [m for m in CONVERSATION if "tool_calls" not in m]
    chat = tokenize_hf(tokenizer, HFChatTemplate(CHATML, special), messages, None, EOS)
    runs = [tokenizer.decode(r) for r in masked_runs(chat.ids, chat.loss_mask)]
    assert runs == ["It is four.<|im_end|>\n", "Twelve.<|im_end|>\n"]
    assert chat.ids[-1] == EOS and chat.loss_mask[-1] == 0
    assert tokenizer.decode(chat.ids[:-1]) == HFChatTemplate(CHATML, special).render(messages, None, False)


def make_chats(path: str, n: int, seed: int = 0) -> list[str]:
    """Write n random multi-turn chats plus bad lines; returns every assistant reply."""
    rng = random.Random(seed)
    replies, lines = [], []
    for k in range(n):
        msgs = [{"role": "system", "content": "sys " + rng.choice(WORDS)}] if k % 3 == 0 else []
        for _ in range(rng.randint(1, 2)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))})
            reply = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
            replies.append(reply)
            msgs.append({"role": "assistant", "content": reply})
        lines.append(json.dumps({"messages": msgs}))
        if k == 5:
            lines += ['{"messages": [', json.dumps({"messages": [{"role": "user", "content": "no reply"}]})]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return replies


@pytest.fixture(scope="module")
def sft_data(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    replies = make_chats(str(d / "chats.jsonl"), 120)
    summary = preprocess_sft([str(d / "chats.jsonl")], os.path.join(tiny, "tokenizer"), str(d / "sft"),
                             seq_length=SEQ, workers=2)
    return str(d / "sft"), replies, summary


def sft_cfg(prefix, **kw):
    return DataConfig(paths=[prefix], sft=True, seq_length=SEQ, split="90,10,0", reset_position_ids=True,
                      reset_attention_mask=True, **kw)


def take(cfg, *, consumed, n, dp_rank, dp_size, mbs=2, gbs=4):
    train, _ = build_sft_iterators(cfg, seed=3, micro_batch_size=mbs, global_batch_size=gbs, train_samples=24,
                                   eval_samples=4, dp_rank=dp_rank, dp_size=dp_size,
                                   consumed_train_samples=consumed)
    return [next(train) for _ in range(n)]


def test_sft_cli_counts_bad_lines(sft_data):
    _, _, summary = sft_data
    assert summary.conversations == 120 and summary.skipped == 2
    assert summary.skipped_by_reason["malformed_json"]["examples"][0].endswith(
        ":7: malformed_json (Expecting value (column 1))")
    assert summary.skipped_by_reason["no_assistant_turn"]["examples"][0].endswith(":8: no_assistant_turn")
    assert 0 < summary.packed_samples < summary.conversations


def conversation_lengths_by_pack(prefix: str) -> dict:
    """{token ids of a packed sample: its conversation lengths}, read straight from the index."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    out = {}
    for d in range(len(ds.document_indices) - 1):
        seqs = range(ds.document_indices[d], ds.document_indices[d + 1])
        ids = sum((ds[s].tolist() for s in seqs), [])
        out[tuple(ids)] = [int(ds.sequence_lengths[s]) for s in seqs]
    return out


def test_packed_conversations_never_see_each_other(sft_data, tokenizer):
    prefix, replies, _ = sft_data
    packs = conversation_lengths_by_pack(prefix)
    batches = take(sft_cfg(prefix), consumed=0, n=6, dp_rank=0, dp_size=1)
    packed_several = False
    for b in batches:
        for tokens, labels, loss, pos, mask in zip(b["tokens"], b["labels"], b["loss_mask"], b["position_ids"],
                                                   b["attention_mask"].dense()[:, 0]):
            full = tokens.tolist() + [labels[-1].item()]
            lengths = next(v for k, v in packs.items() if tuple(full[: len(k)]) == k)
            packed_several |= len(lengths) >= 2
            # Segment of every position: conversation k, then padding as one more segment.
            seg = torch.tensor(sum(([k] * n for k, n in enumerate(lengths)), []) + [len(lengths)] * (SEQ + 1))[:SEQ]
            same = seg[:, None] == seg[None, :]
            causal = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))
            assert torch.equal(~mask, same & causal)
            starts = {int(s): int((seg == s).nonzero()[0]) for s in seg.unique()}
            assert torch.equal(pos, torch.arange(SEQ) - torch.tensor([starts[int(s)] for s in seg]))
            # Loss only on assistant replies (each run = one reply + EOS), never across a boundary.
            for run in masked_runs(labels.tolist(), loss.tolist()):
                assert run[-1] == EOS and tokenizer.decode(run[:-1]) in replies
    assert packed_several


def test_sft_resume_and_dp_change(sft_data):
    prefix, _, _ = sft_data
    cfg = sft_cfg(prefix)

    def glob(per_rank):
        return torch.cat([per_rank[r][s]["tokens"] for s in range(len(per_rank[0])) for r in range(len(per_rank))])

    straight = glob([take(cfg, consumed=0, n=4, dp_rank=r, dp_size=2) for r in range(2)])
    resumed = glob([take(cfg, consumed=8, n=2, dp_rank=r, dp_size=2) for r in range(2)])
    dp1 = glob([take(cfg, consumed=8, n=4, dp_rank=0, dp_size=1)])
    assert torch.equal(straight[8:], resumed) and torch.equal(straight[8:], dp1)
    masks = [take(cfg, consumed=8, n=1, dp_rank=0, dp_size=2)[0]["loss_mask"],
             take(cfg, consumed=0, n=3, dp_rank=0, dp_size=2)[2]["loss_mask"]]
    assert torch.equal(masks[0], masks[1])


def test_128k_packs_keep_conversations_apart_without_a_dense_mask():
    """SFT packed to 128k (the recipes' length): every tensor of the sample is O(s), and the
    document starts are the conversations' (and the padding's) first positions."""
    import numpy as np

    from longcat_megatron.data.pretrain import collate
    from longcat_megatron.data.sft import pack_to_sample

    seq = 131072
    lengths = np.array([40000, 3, 70000, 17])                 # 110,020 tokens, then padding
    ids = np.arange(lengths.sum()) % 97 + 3
    sample = pack_to_sample(ids, np.ones_like(ids), lengths, seq, True, True)
    assert max(v.numel() for v in sample.values()) <= seq + 1
    batch = collate([sample])
    assert batch["attention_mask"].starts == ((0, 40000, 40003, 110003, 110020),)
    assert batch["position_ids"][0, 110003] == 0 and batch["position_ids"][0, 110019] == 16
    one = np.arange(seq + 1) % 97 + 3                        # one conversation fills the sample
    full = pack_to_sample(one, np.ones(seq + 1), np.array([seq + 1]), seq, True, True)
    assert collate([full])["attention_mask"].starts == ((0,),)


def test_mismatched_mask_dataset_is_a_clear_error(sft_data, tmp_path):
    prefix, _, _ = sft_data
    other = str(tmp_path / "other")
    for suffix in ("", "_loss_mask"):
        for ext in (".bin", ".idx", ".meta.json"):
            shutil.copy(prefix + suffix + ext, other + suffix + ext)
    with open(other + "_loss_mask.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(Exception, match="do not match"):
        take(sft_cfg(other), consumed=0, n=1, dp_rank=0, dp_size=1)


def test_sft_cli_uses_the_tokenizers_chat_template(tiny, tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokdir = str(tmp_path / "tok")
    shutil.copytree(os.path.join(tiny, "tokenizer"), tokdir)
    cfg_file = os.path.join(tokdir, "tokenizer_config.json")
    cfg = json.load(open(cfg_file))
    json.dump({**cfg, "chat_template": CHATML}, open(cfg_file, "w"))
    replies = make_chats(str(tmp_path / "chats.jsonl"), 10, seed=5)
    preprocess_sft([str(tmp_path / "chats.jsonl")], tokdir, str(tmp_path / "hf"), seq_length=1024, workers=1)
    ids, masks = IndexedDataset(str(tmp_path / "hf")), IndexedDataset(str(tmp_path / "hf_loss_mask"))
    runs = []
    for i in range(len(ids)):
        runs += [tokenizer.decode(r) for r in masked_runs(ids[i].tolist(), masks[i].tolist())]
    assert runs == [r + "<|im_end|>\n" for r in replies]


# A Llama/Mistral-style template: roles must alternate (raise_exception), and a generation prompt that
# ends with a space, so the reply's first word is tokenized together with it.
ALTERNATING = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
    "{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}Assistant: {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)


def _chat(*turns, **extra):
    roles = ["user", "assistant"] * len(turns)
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)], **extra})


def test_sft_adversarial_records_are_counted_skips(tiny, tokenizer, tmp_path, capsys):
    from data_tools.chat_format import longcat_pieces
    from data_tools.sft import main as sft_main
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tools = [{"name": "add", "parameters": {"a": "int"}}]
    user = {"role": "user", "content": "hi"}
    lines = [
        _chat("use a tool", "ok", tools=tools),                                                    # 1 good + tools
        json.dumps({"messages": [user, {"role": "assistant", "content": "x", "tool_calls": 5}]}),  # 2
        json.dumps({"messages": [user, {"role": "assistant", "content": "x", "tool_calls": {"name": "f"}}]}),  # 3
        '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',  # 4
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}),                                # 5
        json.dumps({"messages": [user, {"role": "assistant", "content": 5}]}),                      # 6
        json.dumps({"messages": [user]}),                                                           # 7
        _chat("q", "a", tools="add"),                                                               # 8
        "[]",                                                                                       # 9
        json.dumps({"messages": [user, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]}),
        _chat("second", "fine"),                                                                    # 11 good
        _chat("a long question " * 40, "a long answer " * 40),                                      # 12 too long
    ]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--input", str(tmp_path / "chats.jsonl"), "--tokenizer", os.path.join(tiny, "tokenizer"),
            "--output-prefix", str(tmp_path / "lc"), "--seq-length", "200", "--workers", "0", "--quiet"]
    assert sft_main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("conversations: 2  packed samples: 1  ")
    summary = json.load(open(tmp_path / "lc.summary.json"))
    assert {c: e["count"] for c, e in summary["skipped_by_reason"].items()} == {
        "bad_tool_calls": 3, "lone_surrogate": 1, "bad_message": 1, "bad_content": 1, "no_assistant_turn": 1,
        "bad_tools": 1, "not_an_object": 1, "too_long": 1}
    assert [e.split(": ", 1)[1] for e in summary["skipped_by_reason"]["bad_tool_calls"]["examples"]] == [
        "bad_tool_calls (messages[1].tool_calls is a JSON number, not a list)",
        "bad_tool_calls (messages[1].tool_calls is a JSON object, not a list)",
        "bad_tool_calls (messages[1].tool_calls[0] has no string 'name' (or function.name))"]
    # The tools of a record are part of the (no-loss) prompt in longcat mode.
    ids = IndexedDataset(str(tmp_path / "lc"))
    msgs = json.loads(lines[0])["messages"]
    expected = sum((tokenizer.encode(t, add_special_tokens=False).ids + ([EOS] if loss else [])
                    for t, loss in longcat_pieces(msgs, tools)), [])
    assert ids[0].tolist() == expected and tokenizer.decode(expected).startswith("TOOLS:[{")
    # --truncate keeps the over-long conversation, cut to seq-length + 1 tokens ending with EOS.
    assert sft_main(args + ["--truncate"]) == 0
    ids = IndexedDataset(str(tmp_path / "lc"))
    assert len(ids) == 3 and len(ids[2]) == 201 and ids[2][-1] == EOS
    # Nothing usable at all: an error, not an empty dataset.
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[1:10]) + "\n")
    capsys.readouterr()
    assert sft_main(args[:1] + [str(tmp_path / "bad.jsonl")] + args[2:3] + args[3:4] + ["--output-prefix",
                    str(tmp_path / "none")] + args[6:]) == 2
    assert "produced no conversations (9 records skipped: 3 x bad_tool_calls" in capsys.readouterr().err and not os.path.exists(tmp_path / "none.bin")


def test_sft_hf_template_exceptions_skip_and_boundary_token_is_learned(tiny, tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokdir = str(tmp_path / "tok")
    shutil.copytree(os.path.join(tiny, "tokenizer"), tokdir)
    cfg_file = os.path.join(tokdir, "tokenizer_config.json")
    json.dump({**json.load(open(cfg_file)), "chat_template": ALTERNATING}, open(cfg_file, "w"))
    lines = [_chat("hello", "the answer"),
             json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                      {"role": "assistant", "content": "c"}]}),
             _chat("again", "the end")]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    summary = preprocess_sft([str(tmp_path / "c.jsonl")], tokdir, str(tmp_path / "hf"), seq_length=256, workers=0)
    assert summary.conversations == 2 and summary.skipped == 1
    assert summary.skipped_by_reason["template_error"]["examples"][0].endswith(
        ":2: template_error (TemplateError: Conversation roles must alternate user/assistant/user/assistant)")
    assert any("2 assistant turn(s) start inside a token" in n for n in summary.notes)
    ids, masks = IndexedDataset(str(tmp_path / "hf")), IndexedDataset(str(tmp_path / "hf_loss_mask"))
    learned = [tokenizer.decode(r, skip_special_tokens=False)
               for i in range(len(ids)) for r in masked_runs(ids[i].tolist(), masks[i].tolist())]
    assert learned == [" the answer<|endoftext|>", " the end<|endoftext|>"]  # " the" straddles "Assistant: "
    # A template that does not compile is one named error, before any record is read.
    from data_tools.chat_format import ChatFormatError

    json.dump({**json.load(open(cfg_file)), "chat_template": "{% for m in messages %}"}, open(cfg_file, "w"))
    with pytest.raises(ChatFormatError, match="chat_template does not compile"):
        preprocess_sft([str(tmp_path / "c.jsonl")], tokdir, str(tmp_path / "hf2"), seq_length=256, workers=0)


def test_sft_cli_progress_bar_and_ctrl_c(tiny, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fifo = str(tmp_path / "chats.jsonl")
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "data_tools.sft", "--input", fifo, "--tokenizer",
                             os.path.join(tiny, "tokenizer"), "--output-prefix", str(tmp_path / "out" / "s"),
                             "--seq-length", "64", "--workers", "1"], cwd=root,
                            env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = open(fifo, "w")
    writer.write(_chat("hi", "there") + "\n")
    writer.flush()
    deadline = time.monotonic() + 120
    while not (os.path.isdir(tmp_path / "out") and os.listdir(tmp_path / "out")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    writer.close()
    assert proc.returncode == 130 and "sft:" in err and "interrupted (Ctrl-C): nothing was written" in err, err
    assert "Traceback" not in err and os.listdir(tmp_path / "out") == []
