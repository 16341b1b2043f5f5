"""StarGAN v2's sample mode on latents (the official `core/utils.py`): the reference grid and the
style-interpolation videos, shared by translate.py and the app.

- **Reference grid** (`translate_using_reference`'s `reference.jpg`): a header row with a blank
  corner and the references, then one row per source: the source, and the source in each
  reference's style.
- **Interpolation videos** (`video_ref`, `video_latent`): a row of sources above the row of their
  translations, whose style glides from one key style to the next by a lerp of style codes (the
  official's `torch.lerp(s_prev, s_next, alpha)`), eased by a sigmoid and held at each key style
  (`get_alphas`). Keys are references through the style encoder (`video_ref`, the reference beside
  the row sliding in as the official's `slide` does) or random styles of each target domain through
  the mapping network (`video_latent`). Between segments (target domains) the video cuts, as the
  official skips pairs of different domains; the last frame is held at the end.
- **Writers**: `.mp4` (H.264, yuv420p: plays everywhere), `.mkv` (FFV1: lossless RGB, for editing
  and exact checks), both through the ffmpeg binary that the imageio-ffmpeg wheel ships, and `.gif`
  (Pillow, one adaptive palette per frame, a run of identical frames stored once with the sum of
  their durations: for READMEs). Frames stream to the encoder chunk by chunk, so a long video never
  sits in memory (a GIF's palette-mapped frames do, one byte a pixel).

Latents in are raw; the networks see `space.normalize(raw)` (inference.translate_pairs). Pictures are
RGB in [0, 1], `[B, 3, H, W]`, decoded by the VAE or shown by the linear latent preview (vae.to_rgb).
"""

import contextlib
import os

import numpy as np
import torch
import torch.nn.functional as F

from inference import reference_styles, translate_pairs
from runtime import InputError, atomic_write
from vae import to_rgb, to_uint8

# get_alphas: one frame at the old style, a sigmoid over t in [-5, 5) in steps of 0.2 (50 frames),
# then 10 frames at the new style: 61 frames per transition, 10 more copies of the last frame at the end.
EASE_SPAN = 5.0
FRAMES_PER_TRANSITION = 61
HOLD_FRAMES = 10
FPS = 15  # the official encodes at 30 fps with setpts=2*PTS: each frame is shown for 1/15 s
SLIDE_MARGIN = 1 / 8  # slide(): a 32 px gap between the 256 px reference column and the row
VIDEO_SUFFIXES = (".mp4", ".mkv", ".gif")
MP4_CRF = 18  # x264's "visually lossless" quality
INSTALL_HINT = "pip install imageio-ffmpeg (or pip install -r requirements-app.txt)"


# ---------------------------------------------------------------------- easing and schedule

def default_hold(frames_per_transition):
    """Held frames in the official's proportion (10 of 61), so a shorter transition keeps its shape."""
    return round(frames_per_transition * HOLD_FRAMES / FRAMES_PER_TRANSITION)


def ease_alphas(frames_per_transition=FRAMES_PER_TRANSITION, hold_frames=HOLD_FRAMES):
    """The lerp weights of one transition, [T] float64: 0, then sigmoid(t) for `T - 1 - hold` values
    of t evenly spaced over [-5, 5) (the official's np.arange(-5, 5, 0.2) at the defaults), then
    `hold` ones. With an even number of eased frames, t = 0 is one of them: alpha exactly 0.5."""
    eased = frames_per_transition - 1 - hold_frames
    if hold_frames < 0 or eased < 1:
        raise ValueError(f"frames_per_transition {frames_per_transition} must exceed hold_frames {hold_frames} + 1")
    t = -EASE_SPAN + 2 * EASE_SPAN * torch.arange(eased, dtype=torch.float64) / eased
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.sigmoid(t), torch.ones(hold_frames, dtype=torch.float64)])


def interpolation_schedule(keys_per_segment, frames_per_transition=FRAMES_PER_TRANSITION, hold_frames=HOLD_FRAMES):
    """Per frame (prev key [F] long, next key [F] long, alpha [F] float64); frame f shows the style
    lerp(key[prev[f]], key[next[f]], alpha[f]). Keys are numbered through the segments in order;
    inside a segment every consecutive pair is one transition of `ease_alphas`, between segments the
    video cuts, and the final frame is repeated `hold_frames` times at the end.
    F = sum(keys - 1) * frames_per_transition + hold_frames."""
    if not keys_per_segment or min(keys_per_segment) < 2:
        raise ValueError(f"every segment needs at least 2 key styles, got {list(keys_per_segment)}")
    alphas = ease_alphas(frames_per_transition, hold_frames)  # [T]
    starts = torch.cat([torch.arange(first, first + count - 1) for first, count in
                        zip(np.cumsum([0, *keys_per_segment[:-1]]).tolist(), keys_per_segment)])  # [transitions]
    prev = starts.repeat_interleave(len(alphas))  # [transitions * T]
    alpha = alphas.repeat(len(starts))
    prev = torch.cat([prev, prev[-1:].expand(hold_frames)])  # the official appends the last frame 10 more times
    alpha = torch.cat([alpha, alpha[-1:].expand(hold_frames)])
    return prev, prev + 1, alpha


def num_frames(keys_per_segment, frames_per_transition=FRAMES_PER_TRANSITION, hold_frames=HOLD_FRAMES):
    return sum(k - 1 for k in keys_per_segment) * frames_per_transition + hold_frames


# ---------------------------------------------------------------------- pictures

def fit(pictures, size):
    """[B, 3, h, w] -> [B, 3, *size]: area averaging to shrink, bilinear to enlarge; as is when equal."""
    if tuple(pictures.shape[-2:]) == tuple(size):
        return pictures
    shrink = size[0] <= pictures.shape[-2] and size[1] <= pictures.shape[-1]
    if shrink:
        return F.interpolate(pictures, size=size, mode="area")
    return F.interpolate(pictures, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def pictures_of(raw_latents, vae, space, batch_size=16, cell_size=None):
    """Raw latents [B, C, h, w] -> RGB [B, 3, H, W] in [0, 1] on the CPU (VAE or preview), resized
    to `cell_size` x `cell_size` when given."""
    rgb = to_rgb(raw_latents, vae, space, batch_size)
    return rgb if cell_size is None else fit(rgb, (cell_size, cell_size))


def source_grid(source_rgb, output_rgb, header_rgb=None):
    """translate_using_reference's layout as cells for vae.image_grid: [rows * (M + 1), 3, H, W] with
    rows = N (+ 1 with a header). `source_rgb` [N, 3, H, W] is the first column, `output_rgb`
    [N, M, 3, H, W] the cells, `header_rgb` [M, 3, H, W] (the references) the first row after a
    white corner (the official's `wb`). Returns (cells, rows)."""
    n, m = output_rgb.shape[:2]
    rows = torch.cat([source_rgb[:, None], output_rgb], dim=1)  # [N, M + 1, 3, H, W]
    if header_rgb is not None:
        header = torch.cat([torch.ones_like(source_rgb[:1]), fit(header_rgb, source_rgb.shape[-2:])])  # [M + 1, ...]
        rows = torch.cat([header[None], rows])
    return rows.flatten(0, 1), rows.shape[0]


@torch.no_grad()
def reference_grid(generator, style_encoder, sources_raw, refs_raw, domain_id, space, vae=None,
                   batch_size=16, device="cpu", cell_size=None, on_batch=None):
    """The reference grid: every source [N, C, h, w] in the style of every reference [M, C, h', w']
    (E for the target domain `domain_id`), pictured. Returns (cells [(N + 1) * (M + 1), 3, H, W],
    rows = N + 1): a header row of the references, then per source the source and its M outputs.
    `on_batch(n)` after each batch of n outputs (a progress display)."""
    n, m = sources_raw.shape[0], refs_raw.shape[0]
    styles = reference_styles(style_encoder, refs_raw, domain_id, space, batch_size, device)  # [M, S]
    outputs = []
    for _, raw in translate_pairs(generator, sources_raw, styles, space, batch_size, device):
        outputs.append(pictures_of(raw, vae, space, batch_size, cell_size))
        if on_batch is not None:
            on_batch(len(raw))
    outputs = torch.cat(outputs)
    source_rgb = pictures_of(sources_raw, vae, space, batch_size, cell_size)  # [N, 3, H, W]
    ref_rgb = pictures_of(refs_raw, vae, space, batch_size, cell_size)  # [M, 3, H', W']
    return source_grid(source_rgb, outputs.view(n, m, *outputs.shape[1:]), ref_rgb)


# ---------------------------------------------------------------------- frames

def slide(prev_rgb, next_rgb, alpha, margin):
    """The official `slide`: the reference column beside the row, [f, 3, 2H, W + margin] (any
    dtype), black background. The two key pictures stacked (prev above next) are drawn from canvas
    row floor(H * (1 - alpha)) down: at alpha 0 the current reference sits beside the translations
    (the lower half), and as alpha grows it moves up beside the sources while the next one rises in."""
    f, c, h, w = prev_rgb.shape
    merged = torch.cat([prev_rgb, next_rgb], dim=2)  # [f, 3, 2H, W]
    top = torch.floor(h * (1 - alpha.double())).long()  # [f]
    rows = torch.arange(2 * h)[None] - top[:, None]  # [f, 2H]: the merged row drawn on each canvas row
    drawn = torch.gather(merged, 2, rows.clamp(min=0)[:, None, :, None].expand(f, c, 2 * h, w))
    column = torch.where((rows >= 0)[:, None, :, None], drawn, torch.zeros((), dtype=drawn.dtype))  # [f, 3, 2H, W]
    return F.pad(column, (0, margin))


def frame_styles(key_styles, schedule):
    """[F, S]: lerp(key[prev], key[next], alpha) per frame (StarGAN v2 interpolates style codes)."""
    prev, nxt, alpha = schedule
    weight = alpha.to(key_styles.device, key_styles.dtype)[:, None]  # [F, 1]
    return torch.lerp(key_styles[prev.to(key_styles.device)], key_styles[nxt.to(key_styles.device)], weight)


@torch.no_grad()
def video_frames(generator, sources_raw, key_styles, schedule, space, vae=None, key_latents=None,
                 batch_size=16, device="cpu", cell_size=None, autocast=contextlib.nullcontext):
    """Yield the video's frames as uint8 chunks [f, 2H, W', 3], in order.

    A frame is the official `interpolate` picture: the sources [N, C, h, w] in a row, their
    translations with the frame's style below (W' = N * W); with `key_latents` (the references,
    [K, C, h', w'] raw, one per key style) the `slide` column is prepended (W' = W + W/8 + N * W).
    Frames go through the generator and the decode in chunks of about `batch_size` pictures; frames
    that share a style (the holds) are computed once. `autocast` wraps the generator calls only."""
    n = sources_raw.shape[0]
    # frames are assembled from uint8 pictures: each picture is converted once, not each frame
    source_rgb = pictures_of(sources_raw, vae, space, batch_size, cell_size)  # [N, 3, H, W]
    _, c, h, w = source_rgb.shape
    top_row = u8(source_rgb).permute(1, 0, 2, 3).reshape(h, n * w, c)  # [H, N*W, 3]
    if key_latents is not None:
        key_u8 = u8(fit(pictures_of(key_latents, vae, space, batch_size), (h, w))).permute(0, 3, 1, 2)  # [K, 3, H, W]
    styles = frame_styles(key_styles, schedule)  # [F, S]
    prev, nxt, alpha = schedule
    per_chunk = max(1, batch_size // n)
    for start in range(0, styles.shape[0], per_chunk):
        chunk = slice(start, start + per_chunk)
        unique, inverse = torch.unique(styles[chunk], dim=0, return_inverse=True)  # [U, S], [f]
        with autocast():
            raw = torch.cat([out for _, out in translate_pairs(generator, sources_raw, unique, space,
                                                               batch_size, device)])  # [N*U, C, h, w], source-major
        fakes = u8(pictures_of(raw, vae, space, batch_size, cell_size)).view(n, len(unique), h, w, c)
        fakes = fakes.permute(1, 2, 0, 3, 4).reshape(len(unique), h, n * w, c)[inverse.cpu()]  # [f, H, N*W, 3]
        frames = torch.cat([top_row.expand_as(fakes), fakes], dim=1)  # [f, 2H, N*W, 3]
        if key_latents is not None:
            column = slide(key_u8[prev[chunk]], key_u8[nxt[chunk]], alpha[chunk], round(w * SLIDE_MARGIN))
            frames = torch.cat([column.permute(0, 2, 3, 1), frames], dim=2)  # [f, 2H, W + margin + N*W, 3]
        yield frames.numpy()


def u8(pictures):
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (a torch view of vae.to_uint8's array)."""
    return torch.from_numpy(to_uint8(pictures))


# ---------------------------------------------------------------------- writing

def check_video_path(path, flag="--video"):
    """The suffix of a video path (.mp4, .mkv or .gif); InputError otherwise, or when the encoder
    it needs is not installed."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in VIDEO_SUFFIXES:
        raise InputError(f"{flag} {path!r}: expected a file name ending in {', '.join(VIDEO_SUFFIXES)}")
    if suffix != ".gif":
        ffmpeg_module()
    return suffix


def ffmpeg_module():
    try:
        import imageio_ffmpeg
    except ImportError:
        raise InputError(f"writing .mp4 / .mkv videos needs the imageio-ffmpeg package (its wheel ships "
                         f"ffmpeg): {INSTALL_HINT}; .gif needs nothing more") from None
    return imageio_ffmpeg


def write_video(path, frame_chunks, fps=FPS, on_frames=None):
    """Write uint8 frame chunks [f, H, W, 3] to `path` (atomically), the format by suffix: .mp4
    (H.264, yuv420p, CRF 18), .mkv (FFV1, lossless RGB) or .gif (Pillow, looping). Frames of odd
    height or width get a black last row / column (yuv420p needs even sizes). `on_frames(f)` is
    called after each chunk (a progress bar). Returns (path, number of frames)."""
    suffix = check_video_path(path, "video")
    count = 0

    def counted():
        nonlocal count
        for chunk in frame_chunks:
            if chunk.shape[1] % 2 or chunk.shape[2] % 2:
                chunk = np.pad(chunk, ((0, 0), (0, chunk.shape[1] % 2), (0, chunk.shape[2] % 2), (0, 0)))
            yield chunk
            count += len(chunk)
            if on_frames is not None:
                on_frames(len(chunk))

    if suffix == ".gif":
        atomic_write(path, lambda f: write_gif(f, counted(), fps))
    else:
        atomic_write(path, lambda f: write_ffmpeg(f.name, counted(), fps, lossless=suffix == ".mkv"))
    return path, count


def write_ffmpeg(path, frame_chunks, fps, lossless):
    """Stream frames to the ffmpeg of imageio-ffmpeg. `path` has no meaningful suffix (the atomic
    writer's temporary name), so the container is named."""
    imageio_ffmpeg = ffmpeg_module()
    writer = None
    try:
        for chunk in frame_chunks:
            if writer is None:
                codec = dict(codec="ffv1", pix_fmt_out="bgr0", output_params=["-f", "matroska"]) if lossless else \
                    dict(codec="libx264", pix_fmt_out="yuv420p",
                         output_params=["-crf", str(MP4_CRF), "-movflags", "+faststart", "-f", "mp4"])
                writer = imageio_ffmpeg.write_frames(path, (chunk.shape[2], chunk.shape[1]), fps=fps, quality=None,
                                                     macro_block_size=2, **codec)
                writer.send(None)  # start ffmpeg
            for frame in chunk:
                writer.send(np.ascontiguousarray(frame))
    finally:
        if writer is not None:
            writer.close()  # waits for ffmpeg to finish the file


def write_gif(f, frame_chunks, fps):
    """An animated GIF to the binary file `f`: every frame quantised to its own 256-colour palette
    (median cut, no dithering: flat regions stay flat and compress), looping forever."""
    from PIL import Image

    frames = [Image.fromarray(frame).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
              for chunk in frame_chunks for frame in chunk]
    if not frames:
        raise ValueError("no frames to write")
    # GIF times frames in centiseconds: round each frame's end time, so the pace stays right over the
    # video (15 fps: 60 and 70 ms alternate) instead of every frame rounding the same way
    durations = np.diff(np.round(np.arange(len(frames) + 1) * 100 / fps)) * 10  # ms
    frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=durations.tolist(), loop=0,
                   optimize=False, disposal=1)
