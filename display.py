"""The training display and the JSON log lines on stdout.

`training.progress_style`: `bar` (tqdm on stderr), `percent` (one stdout line refreshed with \\r,
ended by a newline per epoch, whether or not stdout is a terminal) or `off`. JSON lines are the only
stdout lines that begin with `{`, so `grep '^{'` collects them; the display never splits one.
"""

import json
import os
import stat
import sys
import time

SHOWN = ("d_loss", "g_loss", "r1", "lat_sty", "lat_ds", "lat_cyc")


def json_line(record):
    """One log record as a JSON line: floats to 7 significant digits (small metrics such as KID
    stay readable)."""
    return json.dumps({k: float(f"{v:.7g}") if isinstance(v, float) else v for k, v in record.items()})


class Display:
    """The progress of one epoch: `update` at display steps, `write` for JSON lines, `close` at its end."""

    def __init__(self, style, epoch, epochs, total, start):
        self.style, self.epoch, self.epochs, self.total, self.last = style, epoch, epochs, max(total, 1), start
        self.bar, self.width = None, 0  # width: length of the open percent line (0: none open)
        if style == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True,
                            leave=True, file=sys.stderr)

    @staticmethod
    def text(values):
        parts = [f"{k} {values[k]:.3f}" for k in SHOWN if k in values]
        if values.get("nonfinite_skipped"):
            parts.append(f"skipped {values['nonfinite_skipped']}")
        if values.get("oom_skipped"):
            parts.append(f"oom {values['oom_skipped']}")
        return "  ".join(parts)

    def update(self, done, values):
        if self.style == "bar":
            self.bar.update(done - self.last)
            self.bar.set_postfix_str(self.text(values), refresh=True)
        elif self.style == "percent":
            pct = 100.0 * done / self.total
            line = f"epoch {self.epoch}/{self.epochs} {pct:5.1f}% ({done}/{self.total})  {self.text(values)}"
            sys.stdout.write("\r" + line.ljust(self.width))  # padded: no residue of a longer line
            sys.stdout.flush()
            self.width = len(line)
        self.last = done

    def write(self, line):
        """A JSON line (or any whole line): never inside the bar or the percent line."""
        if self.style == "bar":
            self.bar.write(line, file=sys.stdout)
        elif self.style == "percent":  # end the percent line first: a JSON line must begin with {
            sys.stdout.write(("\n" if self.width else "") + line + "\n")
            sys.stdout.flush()
            self.width = 0
        else:
            print(line, flush=True)

    def close(self, done, values, rate):
        if self.style == "bar":
            self.bar.update(done - self.last)
            if values:
                self.bar.set_postfix_str(self.text(values))
            self.bar.close()
        elif self.style == "percent":
            if values:
                self.update(done, values)
            sys.stdout.write(f"  [{rate:.2f} it/s]\n")
            sys.stdout.flush()


class WorkProgress:
    """The progress of one long piece of work beside the training loop (a grid's VAE decode, an
    evaluation): what it is doing and n of N, in the run's display style (bar: tqdm on stderr,
    percent: one refreshed stdout line, off: nothing). Call it as `progress(n, total)` after each
    batch of n; the display starts at the first call."""

    def __init__(self, desc, style="bar", unit="img"):
        self.desc, self.style, self.unit = desc, style, unit
        self.done, self.total, self.bar = 0, None, None
        self.extra, self.width = "", 0
        self.start = time.perf_counter()

    def __call__(self, n, total):
        if self.total is None:
            self.total = max(int(total), 1)
            if self.style == "bar":
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, dynamic_ncols=True, leave=False,
                                file=sys.stderr)
                if self.extra:
                    self.bar.set_postfix_str(self.extra)
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.style == "percent":
            line = f"{self.desc} {100.0 * self.done / self.total:5.1f}% ({self.done}/{self.total} {self.unit})"
            line += f"  {self.extra}" if self.extra else ""
            sys.stdout.write("\r" + line.ljust(self.width))  # padded: no residue of a longer line
            sys.stdout.flush()
            self.width = len(line)

    def note(self, text):
        """What the work is doing beyond the count (e.g. the task of a long evaluation), shown beside it."""
        self.extra = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)
        elif self.style == "percent" and self.total is not None:
            self(0, self.total)

    def close(self):
        """End the display; returns the seconds since the work began."""
        if self.bar is not None:
            self.bar.close()
        elif self.style == "percent" and self.total is not None:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return time.perf_counter() - self.start


def leave_terminal():
    """Point stdout / stderr that are a terminal at /dev/null (a hung-up terminal fails every write).
    A terminal that has hung up is no longer a tty to `isatty` (its ioctl fails), so any character
    device counts."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                os.dup2(null, fd)
        except OSError:  # closed
            pass
    os.close(null)
