"""The training grid: every `visualization.every_epochs` epochs, one PNG of the EMA networks'
latent- and reference-guided translations of fixed sources and references, decoded by the VAE
(loaded once, lazily; the linear latent preview when it cannot be), and TensorBoard's copy."""

import os

import torch

from config import latent_space, visualization_every
from inference import grid_cells
from model import EMA_NETS
from runtime import InputError, StopRequested
from vae import load_preview_vae, load_vae_or_preview, save_image_grid, to_rgb


class TrainingGrid:
    def __init__(self, cfg, device, dist, log, stop_request, curves):
        self.cfg, self.device, self.dist, self.log = cfg, device, dist, log
        self.stop_request, self.curves = stop_request, curves
        self.domains = list(cfg["data"]["domains"])
        self.space = latent_space(cfg)
        self._vae, self._vae_tried = None, False

    def vae(self):
        """The decoder for grids, loaded once and lazily: the tiny autoencoder of
        `visualization.preview_vae` when set, else the VAE; None (linear latent preview) if neither loads."""
        if not self._vae_tried:
            self._vae_tried = True
            v = self.cfg["visualization"]
            try:  # run.py checked their configs when at hand; one of another space found only now
                # would draw wrong pictures, but the run is not wrong: it goes on
                self._vae = load_preview_vae(v.get("preview_vae"), self.space, self.device, self.log,
                                             quiet=v["suppress_hf_warnings"])
            except InputError as err:
                self.log(f"warning: {err}; grids use the full VAE or the linear latent preview")
            if self._vae is None:
                try:
                    self._vae = load_vae_or_preview(v["vae_path"], v["vae_subfolder"], self.device, self.log,
                                                    quiet=v["suppress_hf_warnings"], space=self.space)
                except InputError as err:
                    self.log(f"warning: {err}; grids use the linear latent preview")
        return self._vae

    def epoch_end(self, epoch, ema, samples, stopping):
        """Rank 0 draws the grid at its epoch interval (not when the run is stopping: it exits
        promptly); every rank learns whether that failed, so none waits in a collective."""
        failed = None
        if not stopping and epoch % visualization_every(self.cfg) == 0 and self.dist.is_main:
            try:
                path = self.save(epoch, ema, samples)
                if path:
                    self.log(f"epoch {epoch}: grid {path}")
                    self.curves.image("grid", path, epoch)
            except Exception as err:  # e.g. a failed write: every rank stops, none waits in a collective
                failed = err
        self.dist.raise_if_any_failed(failed)

    def save(self, epoch, ema, samples):
        """The grid of `grid_cells` (fixed sources and references, `ema`: the EMA nets) as
        <visualization.save_dir or checkpoint_dir/vis>/epoch_NNNN.png; None when a stop request
        ended the decoding."""
        G, F, E = (ema[n] for n in EMA_NETS)
        cells, row_labels = grid_cells(G, F, E, samples["sources"], samples["references"], self.domains,
                                       self.space, self.cfg["model"]["latent_dim"], self.cfg["seed"],
                                       self.device)
        keep = ~torch.isnan(cells.flatten(1)).any(1)  # the blank corner stays white
        vae, count = self.vae(), int(keep.sum())
        progress, hook = self.stop_request.long_work(f"epoch {epoch}: grid (VAE decode)")
        try:  # on the CPU a real VAE takes seconds per cell: small batches keep a stop request prompt
            decoded = to_rgb(cells[keep], vae, self.space, batch_size=16 if self.device.type == "cuda" else 2,
                             on_batch=lambda n: hook(n, count))
        except StopRequested:
            self.log(f"epoch {epoch}: grid abandoned (stop requested); latest.pt will hold this epoch")
            return None
        finally:
            progress.close()
        rgb = torch.ones(cells.shape[0], *decoded.shape[1:])
        rgb[keep] = decoded
        folder = self.cfg["visualization"]["save_dir"] or os.path.join(self.cfg["training"]["checkpoint_dir"], "vis")
        return save_image_grid(os.path.join(folder, f"epoch_{epoch:04d}.png"), rgb, nrow=len(row_labels),
                               row_labels=row_labels, col_labels=["source"] + self.domains)
