"""What demos 03-06 and 08 share: the run they sample from (imported as `from _common import load_model`).

    model, schedule, cfg = load_model(args)    # args.checkpoint, args.tiny, args.out, args.device

--checkpoint names a run folder (from demos/02_train_digits.py or `tinydiff train`) or its
model.safetensors; tinydiff.runs.load_run loads it (EMA weights, eval mode). With --tiny and no
--checkpoint, a throwaway run of TINY_RUN is trained once in OUT/tiny_run (a few seconds), so
that a demo can be tried, and tested, without a trained model.
"""
import os

from tinydiff import runs, train

TINY_RUN = dict(steps=6, n_feat=8, batch_size=8, timesteps=20, sample_steps=4, sample_per_class=1)


def load_model(args, text=False, default="runs/digits"):
    """The run's model (EMA weights), schedule and config; with --tiny and no run, a throwaway one
    (text=True: a text run, `tinydiff train --text`)."""
    run = args.checkpoint
    if run is None and args.tiny:                              # a throwaway run, made once in --out
        run = os.path.join(args.out, "tiny_text_run" if text else "tiny_run")
        if not os.path.exists(os.path.join(run, "checkpoint.json")):
            train.train(dict(TINY_RUN, out=run, device=args.device, **({"text": True} if text else {})),
                        progress=False)
    try:
        return runs.load_run(run or default, args.device)
    except FileNotFoundError as err:
        raise SystemExit(f"--checkpoint: {err}") from None      # a script may exit; the library raises
