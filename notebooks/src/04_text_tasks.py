# %% [markdown]
# # Text tasks: sequence classification, token classification and question answering with data2vec-text
#
# What this shows: fine-tuning `data2vec-text-base` three ways through the trainer's Python API, then using each
# fine-tuned model through `fd.pipeline`: which novel a passage comes from (text classification), restoring
# capital letters word by word (token classification), and extractive question answering.
#
# **Hardware**: Colab TPU v5e-1 / v6e-1 or a T4 / L4 GPU. **Run time** of the full configuration (3 x 1,000 steps of
# the base model on GLUE SST-2, CoNLL-2003 and a SQuAD subset, downloaded through Hugging Face datasets):
# estimated at 20-40 minutes on a v5e-1 (not measured: no accelerator was available where this was written).
# **Quick configuration** (`CI` or `FLAX_DATA2VEC_QUICK=1`): no network; the tiny preset (4 layers, 128 wide,
# random init, a byte-level BPE built on the training text), batches of 8 on the shipped Jane Austen data: 30 steps
# each of text and token classification and 80 of question answering, 140-205 CPU-seconds (measured,
# other jobs sharing the CPU). The plots show each metric next to its trivial baseline. Only question answering gets
# clearly past its baseline in so few steps; the two classifiers stay at chance / the all-`O` score (from
# scratch they need hundreds of steps; the full configuration fine-tunes the pre-trained base model instead).

# %% tags=["parameters"]
# Parameters (papermill: this cell is tagged `parameters`; values injected after it win)
import os

QUICK = bool(os.environ.get("CI")) or os.environ.get("FLAX_DATA2VEC_QUICK") == "1"  # small CPU configuration
REPO_URL = "https://github.com/OWNER/flax_data2vec"  # the repository cloned when not run inside a checkout
OUTPUT_DIR = "outputs/04_text_tasks"  # figures (PNG) and everything this notebook writes

MODEL = "tiny" if QUICK else "data2vec-text-base"
STEPS = 30 if QUICK else 1000  # per task; quick: question answering gets QA_STEPS
QA_STEPS = 80 if QUICK else STEPS  # quick: also the QA task's learning test (tests/test_notebooks.py)
QA_LEARNING_RATE = 3e-4 if QUICK else 0.0  # 0 = the task's default (1e-4, the fine-tuning recipe)
BATCH_SIZE = 8 if QUICK else 32
MAX_TEXT_TOKENS = 64 if QUICK else 256
QA_MAX_TEXT_TOKENS = 96 if QUICK else 384
LOG_EVERY = 5 if QUICK else 50
N_BUCKETS = 1 if QUICK else 3  # distinct padded lengths = compiled step shapes (quick: compiles dominate)
# data: "" = the shipped Austen data (QA: a tiny set built below from it); on Colab, real sets through hf:
CLASSIFY_DATA = "" if QUICK else "hf:nyu-mll/glue:sst2"
CLASSIFY_TEXT_COLUMN = "" if QUICK else "sentence"
TOKENS_DATA = "" if QUICK else "hf:eriktks/conll2003"
QA_TRAIN = "" if QUICK else "hf:rajpurkar/squad@train[:8000]"
QA_EVAL = "" if QUICK else "hf:rajpurkar/squad@validation[:1000]"
QA_PASSAGES = 1200  # shipped QA set: passages read for training questions
QA_EVAL_PASSAGES = 300  # ... and for eval questions

# %% include setup

# %% include live_plot

# %%
from flax_data2vec.train.config import TrainConfig
from flax_data2vec.train.loop import train

live = LivePlot([("text-classification", ["classify_loss"]), ("token-classification", ["tokens_loss"]),
                 ("question-answering", ["qa_loss"])], every=4, title=f"fine-tuning {MODEL}: train loss")


def run(task, name, **fields):
    """Train one task into OUTPUT_DIR/name; its train losses go to the live plot as NAME_loss."""
    def on_log(row):
        if "loss" in row:
            live({"step": row["step"], name + "_loss": row["loss"]})

    steps = fields.pop("max_steps", STEPS)
    cfg = TrainConfig(task=task, model=MODEL, max_steps=steps, batch_size=BATCH_SIZE, log_every=LOG_EVERY,
                      eval_every=steps, save_every=steps, n_buckets=N_BUCKETS,
                      output_dir=os.path.join(OUTPUT_DIR, name), progress=not QUICK, **fields)
    return train(cfg, on_log=on_log)

# %% [markdown]
# ## Sequence classification
#
# Shipped default: which of Jane Austen's six novels a 1-3 sentence passage comes from (1,200 train and 300 eval
# passages from different parts of each novel; chance is 1/6, a naive Bayes bag of words gets 0.52).

# %%
classify = run("text-classification", "classify", max_text_tokens=MAX_TEXT_TOKENS, train_data=CLASSIFY_DATA,
               text_column=CLASSIFY_TEXT_COLUMN)
print("eval accuracy:", round(classify["eval_accuracy"], 3))

# %% [markdown]
# ## Token classification
#
# Shipped default: truecasing. The text is lower-cased and each word is tagged `O`, `Cap` or `UPPER` by its
# original case; tagging every word `O` scores about 0.89 token accuracy. (With CoNLL-2003 on Colab: named
# entities, scored by seqeval's entity F1.)

# %%
tokens = run("token-classification", "tokens", max_text_tokens=MAX_TEXT_TOKENS,
             train_data=TOKENS_DATA)
print("eval token accuracy:", round(tokens["eval_accuracy"], 3))

# %% [markdown]
# ## Question answering
#
# A tiny SQuAD-style set built from the shipped passages with the trainer's own rule: for each title (Mr., Mrs.,
# Miss, Lady, Sir, Colonel, Captain, Dr.) in a passage, "Which name follows the first Mr.?", answered by the
# capitalised words after it. Training questions come from the first `QA_PASSAGES` training passages, eval questions
# from the eval passages (other parts of the novels). A random span scores about 0 exact match.

# %%
import json

from flax_data2vec.train.tasks.question_answering import title_questions


def passages(name):
    with open(os.path.join(DATA, "text", name), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


qa_train, qa_eval = QA_TRAIN, QA_EVAL
if not QA_TRAIN:
    qa_train, qa_eval = os.path.join(OUTPUT_DIR, "qa_train.jsonl"), os.path.join(OUTPUT_DIR, "qa_eval.jsonl")
    for path, rows in ((qa_train, title_questions(passages("classify_train.jsonl")[:QA_PASSAGES])),
                       (qa_eval, title_questions(passages("classify_eval.jsonl")[:QA_EVAL_PASSAGES]))):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{os.path.basename(path)}: {len(rows)} questions")
    print(json.dumps(rows[0], indent=1)[:600])

# %%
qa = run("question-answering", "qa", max_text_tokens=QA_MAX_TEXT_TOKENS, train_data=qa_train,
         max_steps=QA_STEPS, learning_rate=QA_LEARNING_RATE,
         eval_data=qa_eval)
print("eval exact match:", round(qa["eval_exact_match"], 3), "F1:", round(qa["eval_f1"], 3))
live.save(os.path.join(OUTPUT_DIR, "text_training_curves.png"))

# %% [markdown]
# ## Final metrics next to their trivial baselines

# %%
names = ["novel\n(accuracy)", "truecasing\n(token accuracy)", "QA\n(exact match)", "QA\n(F1)"]
values = [classify["eval_accuracy"], tokens["eval_accuracy"], qa["eval_exact_match"], qa["eval_f1"]]
shipped = not (CLASSIFY_DATA or TOKENS_DATA or QA_TRAIN)
baselines = [1 / 6, 0.89, 0.0, 0.0]  # chance over 6 novels; every word tagged O; a random span
fig, ax = plt.subplots(figsize=(7.5, 3.8))
ax.bar(range(len(names)), values, color=["C0", "C1", "C2", "C2"])
if shipped:
    ax.scatter(range(len(names)), baselines, marker="_", s=900, color="crimson", zorder=3, label="trivial baseline")
    ax.legend(loc="upper left")
for i, v in enumerate(values):
    ax.text(i, max(v, baselines[i] if shipped else 0) + 0.04, f"{v:.3f}", ha="center")
ax.set_xticks(range(len(names)), names)
ax.set_ylim(0, 1.1)
ax.set_title(f"eval metrics after {STEPS} / {STEPS} / {QA_STEPS} steps ({MODEL})")
fig.savefig(os.path.join(OUTPUT_DIR, "text_metrics.png"), dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Each model through `pipeline`
#
# The run folders are models: `fd.pipeline` reads the tokenizer and labels the trainer saved with them.

# %%
eval_passages = [json.loads(line) for line in open(os.path.join(DATA, "text", "classify_eval.jsonl"))]
classifier = fd.pipeline("text-classification", os.path.join(OUTPUT_DIR, "classify"))
for row, top in zip(eval_passages[:3], classifier([r["text"] for r in eval_passages[:3]], top_k=2)):
    print(f"{row['label']:>22} | predicted: " + ", ".join(f"{t['label']} {t['score']:.2f}" for t in top))

# %%
tagger = fd.pipeline("token-classification", os.path.join(OUTPUT_DIR, "tokens"), aggregation_strategy="first")
sentence = eval_passages[0]["text"]
lowered = sentence.lower()
restored = list(lowered)
for entity in tagger(lowered):  # words tagged other than O
    word = slice(entity["start"], entity["end"])
    restored[word] = lowered[word].upper() if entity["entity_group"] == "UPPER" else lowered[word].capitalize()
print("input:    ", lowered[:200])
print("restored: ", "".join(restored)[:200])
print("original: ", sentence[:200])

# %%
answerer = fd.pipeline("question-answering", os.path.join(OUTPUT_DIR, "qa"))
if not QA_TRAIN:
    examples = [json.loads(line) for line in open(qa_eval)][:3]
else:
    examples = [{"question": "Who wrote Emma?", "context": "Emma is a novel by Jane Austen, published in 1815.",
                 "answers": {"text": ["Jane Austen"]}}]
for ex in examples:
    answer = answerer(question=ex["question"], context=ex["context"])
    print(f"{ex['question']} -> {answer['answer']!r} (score {answer['score']:.2f}; gold {ex['answers']['text'][0]!r})")
