"""The prototype atlas: the trained artefact a user needs after training (method.md §7).

A directory::

    atlas.json       format version, model config, studies, decoding constants, versions, seed
    model.pt         state_dict of :class:`~scproto_scale.model.scproto.ScProto`
    genes.tsv        the model's gene ids, one per line
    prototypes.npy   (K, d) float32 unit prototypes
    metacells.h5ad   decoded prototype profiles (K × G) with size, study mix, labels

written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from scproto_scale.atlas.genes import GeneAlignment, align_to_model, gene_selector
from scproto_scale.config import ModelConfig
from scproto_scale.data.store import CellStore
from scproto_scale.data.writers import atomic_directory
from scproto_scale.errors import ScprotoInputError
from scproto_scale.model.scproto import ScProto, log_normalize_torch
from scproto_scale.provenance import versions

ATLAS_FORMAT = 1


@dataclass
class Embedding:
    """Per-cell outputs of :meth:`PrototypeAtlas.embed_store`.

    Attributes:
        X_scproto: ``(n, d)`` float32 unit embeddings ``normalize(mu)``.
        mu_norm: ``(n,)`` float32 ``‖mu‖`` (used to rescale prototypes for decoding).
        prototype: ``(n,)`` int64 nearest prototype (argmax cosine).
        confidence: ``(n,)`` float32 cosine similarity to it.
        sample_prototype: ``(n,)`` int64 nearest prototype of one posterior sample per cell,
            or None (``embed_store(..., sample_seed=None)``).
        sample_cosine: ``(n,)`` float32 ``cos(normalize(z), normalize(mu))`` of that sample,
            or None.
    """

    X_scproto: np.ndarray
    mu_norm: np.ndarray
    prototype: np.ndarray
    confidence: np.ndarray
    sample_prototype: np.ndarray | None = None
    sample_cosine: np.ndarray | None = None


class PrototypeAtlas:
    """A trained scProto model with its genes, studies and prototypes.

    Args:
        model: the trained :class:`ScProto` (set to eval mode).
        genes: model gene ids (length G).
        studies: study names (condition codes index into it).
        meta: extra metadata (``median_library_size``, ``latent_norm``, config, seed…).
    """

    def __init__(self, model: ScProto, genes: list[str], studies: list[str], meta: dict):
        self.model = model.eval()
        self.genes, self.studies, self.meta = list(genes), list(studies), dict(meta)

    @property
    def prototypes(self) -> np.ndarray:
        """``(K, d)`` float32 unit prototypes."""
        return F.normalize(self.model.prototypes.weight.detach(), dim=1).numpy().astype(np.float32)

    # ----------------------------------------------------------------- embedding
    def _condition_codes(self, names: pd.Series | np.ndarray) -> np.ndarray:
        lookup = {s: i for i, s in enumerate(self.studies)}
        codes = np.array([lookup.get(str(s), -1) for s in names], dtype=np.int64)
        unseen = sorted({str(s) for s, c in zip(names, codes, strict=True) if c < 0})
        if unseen:
            warnings.warn(
                f"{len(unseen)} studies unseen in training ({unseen[:5]}…) are embedded with the "
                "mean condition embedding", stacklevel=3)
        return codes

    @torch.no_grad()
    def embed_counts(self, counts: sp.csr_matrix, library: np.ndarray, condition: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Embed cells given model-gene counts.

        Args:
            counts: ``(n, G)`` CSR counts aligned to :attr:`genes` (missing genes zero).
            library: ``(n,)`` total counts over all of the cell's genes.
            condition: ``(n,)`` int64 study codes, −1 for unseen studies (mean embedding).

        Returns:
            ``(n, d)`` float32 unit embeddings and ``(n,)`` float32 ``‖mu‖``.
        """
        mu, _ = self._posterior(counts, library, condition)
        return F.normalize(mu, dim=1).numpy(), mu.norm(dim=1).numpy()

    def _posterior(self, counts: sp.csr_matrix, library: np.ndarray, condition: np.ndarray
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, d)`` mean and variance of q(z | x, s) (arguments as :meth:`embed_counts`)."""
        cvae = self.model.cvae
        x = torch.from_numpy(np.asarray(counts.toarray(), dtype=np.float32))
        lib = torch.from_numpy(np.asarray(library, dtype=np.float32))
        cond = torch.from_numpy(np.asarray(condition, dtype=np.int64))
        # max-norm applied functionally: nn.Embedding(max_norm) renormalises looked-up rows of
        # the atlas in place, which would change a saved reference after embedding a query
        w = cvae.condition_embedding.weight
        emb = (w / w.norm(dim=1, keepdim=True).clamp(min=1.0))[cond.clamp(min=0)]
        unseen = cond < 0
        if unseen.any():
            emb[unseen] = cvae.mean_condition_embedding()
        return cvae.encode(log_normalize_torch(x, lib), emb)

    def assign(self, X_scproto: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest prototype (argmax cosine) and the cosine as confidence, for ``(n, d)`` unit rows."""
        sims = X_scproto @ self.prototypes.T
        best = sims.argmax(axis=1)
        return best.astype(np.int64), sims[np.arange(len(best)), best].astype(np.float32)

    def align(self, var: pd.DataFrame, min_overlap: float = 0.8, source: str = "input"
              ) -> GeneAlignment:
        """Map the atlas genes onto a dataset's var (stable ids first; see
        :func:`~scproto_scale.atlas.genes.align_to_model`).

        Raises:
            ScprotoInputError: overlap below ``min_overlap`` (numbers and id namespaces named).
        """
        return align_to_model(var, self.genes, self.meta.get("gene_stable_ids"), min_overlap,
                              source)

    def _chunks(self, store: CellStore, batch_key: str, chunk_size: int
                ) -> Iterator[tuple[sp.csr_matrix, np.ndarray, np.ndarray]]:
        select = gene_selector(self.align(store.var, source=str(store.path)).columns,
                               store.n_vars)
        codes = self._condition_codes(store.obs_column(batch_key).astype(str).to_numpy())
        for start, stop, X in store.iter_chunks(chunk_size):
            yield (X @ select).tocsr(), np.asarray(X.sum(axis=1)).ravel(), codes[start:stop]

    @torch.no_grad()
    def embed_store(self, store: CellStore, batch_key: str, chunk_size: int = 8192,
                    sample_seed: int | None = None) -> Embedding:
        """Stream every cell of a store through the frozen encoder (memory: one chunk + outputs).

        With ``sample_seed``, the same pass also draws one posterior sample z ~ q(z | x, s) per
        cell and records its nearest prototype and its cosine to the mean
        (:attr:`Embedding.sample_prototype`): training's SwAV scores ``normalize(z)`` (method.md
        §3), the atlas assigns ``normalize(mu)`` (§7). When the posterior's spread is wide
        against the prototypes' spacing, the bank is laid out over the samples and the means
        fall on few prototypes; comparing the two says how much of the bank the means reach.
        The draws depend on ``sample_seed`` and ``chunk_size``.

        Raises:
            ScprotoInputError: unknown batch key, or too few of the atlas genes in the store.
        """
        gen = torch.Generator().manual_seed(sample_seed) if sample_seed is not None else None
        protos = torch.from_numpy(self.prototypes)
        embs, norms, sampled, cosines = [], [], [], []
        for X, lib, codes in self._chunks(store, batch_key, chunk_size):
            mu, var = self._posterior(X, lib, codes)
            mu_unit = F.normalize(mu, dim=1)
            embs.append(mu_unit.numpy())
            norms.append(mu.norm(dim=1).numpy())
            if gen is not None:
                z = F.normalize(mu + var.sqrt() * torch.randn(mu.shape, generator=gen), dim=1)
                sampled.append((z @ protos.t()).argmax(dim=1).numpy())
                cosines.append((z * mu_unit).sum(dim=1).numpy())
        X_scproto = np.concatenate(embs)
        proto, conf = self.assign(X_scproto)
        if gen is None:
            return Embedding(X_scproto, np.concatenate(norms), proto, conf)
        return Embedding(X_scproto, np.concatenate(norms), proto, conf,
                         np.concatenate(sampled), np.concatenate(cosines))

    def embed_adata(self, adata: ad.AnnData, batch_key: str, chunk_size: int = 8192) -> ad.AnnData:
        """Embed an in-memory AnnData (X = counts); writes ``obsm["X_scproto"]``,
        ``obs["scproto_prototype"]`` and ``obs["scproto_confidence"]`` in place and returns it.

        Raises:
            ScprotoInputError: ``batch_key`` not in obs, or too few atlas genes.
        """
        if batch_key not in adata.obs:
            raise ScprotoInputError(f"obs column {batch_key!r} not in AnnData; "
                                    f"columns: {list(adata.obs.columns)}")
        cols = self.align(adata.var).columns
        codes = self._condition_codes(adata.obs[batch_key].astype(str).to_numpy())
        X = sp.csr_matrix(adata.X, dtype=np.float32)
        lib = np.asarray(X.sum(axis=1)).ravel()
        Xg = (X @ gene_selector(cols, adata.n_vars)).tocsr()
        embs = [self.embed_counts(Xg[s : s + chunk_size], lib[s : s + chunk_size],
                                  codes[s : s + chunk_size])[0]
                for s in range(0, adata.n_obs, chunk_size)]
        emb = np.concatenate(embs)
        proto, conf = self.assign(emb)
        adata.obsm["X_scproto"] = emb
        adata.obs["scproto_prototype"] = pd.Categorical(proto, categories=range(len(self.prototypes)))
        adata.obs["scproto_confidence"] = conf
        return adata

    # ----------------------------------------------------------------- metacells
    @torch.no_grad()
    def decode_prototypes(self) -> np.ndarray:
        """``(K, G)`` float32 metacell profiles, decoded with the mean condition embedding.

        nb/zinb: the NB mean ``ρ · l̄`` with ``l̄`` the median training library size; mse:
        ``expm1`` of the output. Prototypes are rescaled by the mean training ``‖mu‖`` since the
        decoder never saw unit-norm latents (method.md §7).
        """
        cvae = self.model.cvae
        z = torch.from_numpy(self.prototypes) * float(self.meta["latent_norm"])
        emb = cvae.mean_condition_embedding().expand(len(z), -1)
        out = cvae.decode(z, emb)
        if cvae.likelihood == "mse":
            return torch.expm1(out.expr).numpy().astype(np.float32)
        return (out.rho * float(self.meta["median_library_size"])).numpy().astype(np.float32)

    def build_metacells(self, emb: Embedding, study: np.ndarray,
                        labels: np.ndarray | None = None, n_label_neighbors: int = 10
                        ) -> ad.AnnData:
        """Metacell AnnData: decoded profiles plus per-prototype size, study mix and labels.

        Args:
            emb: embeddings and assignments of the training cells.
            study: ``(n,)`` study names of those cells.
            labels: ``(n,)`` cell-type labels (evaluation only) or None.
            n_label_neighbors: a prototype's label is the majority of its this-many most
                similar cells (method.md §7), with that fraction as confidence.

        Returns:
            AnnData ``(K, G)``: X = profiles; obs ``n_cells``, ``n_studies``, ``cross_study``,
            and with labels ``label``, ``label_confidence``, ``majority_label``, ``purity``;
            obsm ``study_fraction`` (K × S DataFrame).
        """
        K = len(self.prototypes)
        names = [f"prototype_{k}" for k in range(K)]
        obs = pd.DataFrame(index=names)
        obs["n_cells"] = np.bincount(emb.prototype, minlength=K)
        mix = pd.crosstab(pd.Categorical(emb.prototype, categories=range(K)),
                          pd.Categorical(np.asarray(study).astype(str)), dropna=False)
        frac = mix.div(mix.sum(axis=1).replace(0, 1), axis=0)
        frac.index = names
        obs["n_studies"] = (mix.to_numpy() > 0).sum(axis=1)
        obs["cross_study"] = obs["n_studies"] >= 2
        if labels is not None:
            labels = np.asarray(labels).astype(str)
            sims = self.prototypes @ emb.X_scproto.T  # (K, n)
            top = np.argpartition(-sims, n_label_neighbors - 1, axis=1)[:, :n_label_neighbors]
            lab, conf = zip(*(_majority(labels[t]) for t in top), strict=True)
            obs["label"] = pd.Categorical(lab)
            obs["label_confidence"] = np.asarray(conf, dtype=np.float32)
            maj, pur = zip(*(_majority(labels[emb.prototype == k]) for k in range(K)), strict=True)
            obs["majority_label"] = pd.Categorical(maj)
            obs["purity"] = np.asarray(pur, dtype=np.float32)
        mc = ad.AnnData(X=self.decode_prototypes(), obs=obs,
                        var=pd.DataFrame(index=pd.Index(self.genes, name="gene_id")))
        mc.obsm["study_fraction"] = frac
        mc.obsm["prototype"] = self.prototypes
        mc.uns["decoding"] = {"condition": "mean of all study embeddings",
                              "library_size": float(self.meta["median_library_size"]),
                              "latent_norm": float(self.meta["latent_norm"])}
        return mc

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path, metacells: ad.AnnData | None = None) -> Path:
        """Write the atlas directory atomically (temporary name, then rename)."""
        path = Path(path)
        with atomic_directory(path, mkdir=True) as tmp:
            torch.save(self.model.state_dict(), tmp / "model.pt")
            (tmp / "genes.tsv").write_text("\n".join(self.genes) + "\n")
            np.save(tmp / "prototypes.npy", self.prototypes)
            meta = {**self.meta, "format_version": ATLAS_FORMAT, "studies": self.studies,
                    "model_config": self.model.config.model_dump(), "n_genes": len(self.genes),
                    "versions": versions()}
            (tmp / "atlas.json").write_text(json.dumps(meta, indent=1))
            if metacells is not None:
                metacells.write_h5ad(tmp / "metacells.h5ad")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PrototypeAtlas:
        """Open an atlas directory.

        Raises:
            ScprotoInputError: missing directory or files, or an incompatible format version
                (both versions named).
        """
        path = Path(path)
        meta_file = path / "atlas.json"
        if not meta_file.exists():
            raise ScprotoInputError(f"no prototype atlas at {path} (missing atlas.json)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format_version") != ATLAS_FORMAT:
            raise ScprotoInputError(
                f"{path}: atlas format {meta.get('format_version')} is not supported by this "
                f"version (format {ATLAS_FORMAT})")
        genes = (path / "genes.tsv").read_text().split()
        cfg = ModelConfig.model_validate(meta["model_config"])
        model = ScProto(len(genes), len(meta["studies"]), cfg)
        model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
        return cls(model, genes, meta["studies"], meta)


def _majority(values: np.ndarray) -> tuple[str, float]:
    """Most frequent value and its fraction ("" and NaN when empty)."""
    if len(values) == 0:
        return "", float("nan")
    uniq, counts = np.unique(values, return_counts=True)
    i = counts.argmax()
    return str(uniq[i]), float(counts[i] / len(values))
