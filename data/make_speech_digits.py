#!/usr/bin/env python3
"""Synthesise the shipped `speech_digits` dataset with espeak-ng.

Each utterance is a short spoken digit string ("three one four") or a short command phrase
("go left", "don't stop"), rendered by one of several espeak-ng voices and voice variants at a
random speed and pitch. Every random choice comes from one seeded `numpy.random.Generator`, so
re-running the script rewrites the same manifests and (with the same espeak-ng version) the same
audio. The audio is resampled to 16 kHz, trimmed, peak-normalised and quantised to a few bits
per sample so that the whole set stays small enough to ship in the repository.

Usage:  python3 data/make_speech_digits.py [--out data/speech_digits] [--seed 1234]
Needs:  apt-get install -y espeak-ng ; python3 -m pip install soundfile scipy numpy
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
         "back", "forward", "open", "close", "red", "green", "blue", "hello", "please", "don't")
LABELS = DIGITS + WORDS  # the classification label is the first spoken word

# Built-in (non-mbrola) English voices and voice variants of espeak-ng 1.51.
VOICES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc",
          "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "klatt4")

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
MIN_SECONDS, MAX_SECONDS = 0.5, 3.0


def make_text(rng: np.random.Generator) -> tuple[str, str]:
    """Draws (text, label): the first word is uniform over LABELS; the rest depends on its kind."""
    first = LABELS[rng.integers(len(LABELS))]
    if first in DIGITS:
        rest = [DIGITS[i] for i in rng.integers(len(DIGITS), size=rng.integers(0, 4))]
    else:
        rest = [WORDS[i] for i in rng.integers(len(WORDS), size=rng.integers(0, 3))]
    return " ".join([first, *rest]), first


def synthesise(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """Runs espeak-ng and returns float64 samples at ESPEAK_RATE."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float64")
    if sr != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng produced {sr} Hz audio, expected {ESPEAK_RATE}")
    return audio


def postprocess(audio: np.ndarray, gain: float, bits: int) -> np.ndarray:
    """Resample to 16 kHz, trim silence to 50 ms margins, pad to MIN_SECONDS, quantise to `bits`."""
    y = resample_poly(audio, SAMPLE_RATE, ESPEAK_RATE)
    loud = np.flatnonzero(np.abs(y) > 0.01 * np.abs(y).max())
    margin = SAMPLE_RATE // 20
    y = y[max(loud[0] - margin, 0): loud[-1] + margin]
    short = int(MIN_SECONDS * SAMPLE_RATE) - len(y)
    if short > 0:
        y = np.pad(y, (short // 2, short - short // 2))
    y = y / np.abs(y).max() * gain
    step = 2 ** (16 - bits)  # FLAC stores the unused low bits for free ("wasted bits")
    return (np.round(y * 32767 / step) * step).astype(np.int16)


def build(out_dir: str, seed: int, n_train: int, n_eval: int, bits: int) -> dict:
    """Generates audio + manifests into out_dir and returns summary statistics."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: apt-get install -y espeak-ng")
    rng = np.random.default_rng(seed)
    audio_dir = os.path.join(out_dir, "audio")
    if os.path.isdir(audio_dir):
        shutil.rmtree(audio_dir)
    os.makedirs(audio_dir)
    stats = {}
    for split, count in (("train", n_train), ("eval", n_eval)):
        rows, seconds = [], 0.0
        while len(rows) < count:
            text, label = make_text(rng)
            voice = f"{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}"
            speed, pitch = int(rng.integers(130, 200)), int(rng.integers(25, 76))
            gain = float(rng.uniform(0.4, 0.95))
            pcm = postprocess(synthesise(text, voice, speed, pitch), gain, bits)
            if len(pcm) > MAX_SECONDS * SAMPLE_RATE:
                continue  # too long: draw again (the draw sequence stays deterministic)
            name = f"audio/{split}-{len(rows):04d}.flac"
            sf.write(os.path.join(out_dir, name), pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            rows.append({"path": name, "text": text, "label": label, "voice": voice,
                         "speed": speed, "pitch": pitch})
            seconds += len(pcm) / SAMPLE_RATE
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        stats[split] = {"utterances": len(rows), "seconds": round(seconds, 1)}
    total = sum(os.path.getsize(os.path.join(audio_dir, n)) for n in os.listdir(audio_dir))
    stats["audio_megabytes"] = round(total / 2**20, 2)
    stats["espeak_ng"] = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True,
                                        text=True).stdout.strip()
    return stats


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(here, "speech_digits"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--eval", type=int, default=100)
    p.add_argument("--bits", type=int, default=9, help="effective bits per sample kept in the FLAC")
    args = p.parse_args()
    print(json.dumps(build(args.out, args.seed, args.train, args.eval, args.bits), indent=1))


if __name__ == "__main__":
    main()
