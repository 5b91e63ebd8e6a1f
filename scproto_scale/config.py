"""Validated configuration: one pydantic model per stage, composed into :class:`RunConfig`.

Every YAML key is checked: an unknown or ill-typed key is an error that names it
(``extra="forbid"``). Defaults follow ``docs/method.md``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scproto_scale.errors import ScprotoInputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the cells are and which obs columns matter."""

    path: str = Field(description="h5ad file, AnnData zarr store or TileDB-SOMA experiment")
    batch_key: str = Field(description="obs column of the study / batch whose effect is removed")
    label_key: str | None = Field(None, description="obs column of cell types (evaluation only)")
    store_format: Literal["zarr", "soma"] = Field(
        "zarr", description="format an h5ad input is ingested into"
    )


class PrepareConfig(_Strict):
    """Gene selection, PCA and the KNN graph (method.md §1)."""

    n_top_genes: int = Field(2000, gt=0)
    hvg_span: float = Field(0.3, gt=0, le=1)
    n_pcs: int = Field(50, gt=0)
    n_neighbors: int = Field(50, gt=0)
    exact_knn_max_cells: int = Field(
        200_000, gt=0, description="exact FAISS search up to this many cells, IVF above"
    )
    ivf_nprobe: int = Field(
        128, gt=0, description="IVF lists probed (of 4·√n); 128 keeps recall@50 ≳ 0.95")
    knn_method: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="FAISS index: auto = flat up to exact_knn_max_cells; above, HNSW "
        "on CPU (IVF needs ~7% of its lists probed for recall@50 ≥ 0.95 on 50 PCs: ~N² work) "
        "and IVF on GPU (FAISS has no GPU HNSW)")
    # auto departs from method.md's plain k-NN: on Kang 8 donors (3 seeds) the study-balanced
    # graph raised scIB batch 0.516 → 0.542 and total 0.617 → 0.628 (sweep_kang_scored.md)
    knn_scope: Literal["auto", "all", "per_study"] = Field(
        "auto", description="all: the k nearest cells (method.md); per_study: ⌈k/S⌉ nearest "
        "from each of the S studies (BBKNN's neighbourhood), so an anchor's views cross "
        "studies; auto: per_study for 2 ≤ S ≤ k/2 studies that each have > ⌈k/S⌉ cells, "
        "else all")
    hnsw_m: int = Field(32, gt=1, description="HNSW graph degree M")
    hnsw_ef_construction: int = Field(128, gt=0, description="HNSW build breadth")
    # 192 gave recall@50 0.9495 on 1M cells, 256 0.967 for 5 % more search time (hnsw_ef.json)
    hnsw_ef_search: int = Field(256, gt=0, description="HNSW search breadth (≥ n_neighbors + 1)")
    pca_method: Literal["auto", "exact", "randomized"] = Field(
        "auto", description="auto = exact Gram PCA up to 4,096 genes, randomized above")
    training_cache: Literal["auto", "on", "off"] = Field(
        "auto", description="write the locality-ordered model-gene cache the loader reads "
        "(auto: from cache_min_cells kept cells on)")
    cache_min_cells: int = Field(50_000, gt=0)
    cache_cluster_cells: int = Field(1_000, gt=0, description="cells per locality cluster")
    chunk_size: int = Field(10_000, gt=0, description="rows per streamed chunk")


class ModelConfig(_Strict):
    """The scPoli-style CVAE and the prototype head (method.md §2–5)."""

    likelihood: Literal["nb", "zinb", "mse"] = "nb"
    # latent 32, AdamW 1e-2 and 512 anchors (64 per study) were chosen on Kang 8 donors, the
    # tuning set (README, "Choosing the Kang settings"); the reference's 10 / 1e-3 / 1,024 left
    # 8 of 300 prototypes used on held-out Kang scGen, these 58 (README, "Defaults").
    latent_dim: int = Field(32, gt=0)
    hidden_dims: list[int] | None = Field(None, description="default: [ceil(sqrt(n_genes))]")
    embedding_dim: int = Field(10, gt=0, description="condition embedding size e")
    dropout: float = Field(0.05, ge=0, lt=1)
    n_prototypes: int = Field(300, gt=1)
    temperature: float = Field(0.05, gt=0, description="SwAV softmax temperature τ")
    sinkhorn_epsilon: float = Field(0.02, gt=0)
    sinkhorn_iterations: int = Field(3, gt=0)
    hard_codes: bool = Field(True, description="one-hot codes (reference) or soft (SwAV)")
    # method.md's 1 collapses the embedding onto few prototypes (its minimum is every cell on
    # one prototype): Kang 75 of 300 used at 1, 130 at 0.1, 143 at 0; K = 4,096 synthetic 4 /
    # 25 / 40 (README, "Propagation weight"). 0.1 keeps the term, chosen on Kang.
    lambda_prop: float = Field(0.1, ge=0)
    lambda_prop_dual: float = Field(0.0, ge=0, description="max_k min_i (1-cos) term")
    prop_pulls: Literal["both", "prototypes"] = Field(
        "both", description="the propagation loss moves the worst-covered cell and its nearest "
        "prototype (method.md), or only the prototype (the cell's embedding is detached)")
    lambda_cvae: float = Field(0.01, ge=0)
    queue_length: int = Field(
        0, ge=0, description="per-study queue of embeddings for Sinkhorn (0: off; K ≫ cells/group)"
    )
    queue_start_epoch: int = Field(1, ge=0, description="use the queue from this epoch on")
    # Without it an early queue collapsed the embedding onto 3 of 4,096 prototypes; with it the
    # queue matches no queue (README, "Known limitation: prototype usage").
    queue_recenter: bool = Field(
        True, description="shift each study's queued embeddings by the step's mean drift "
        "(batch mean − queue mean) before Sinkhorn, so stale rows cannot bias the batch's codes")
    kl_weight: float = Field(0.5, ge=0, description="β of the CVAE KL term")
    kl_anneal_epochs: int = Field(0, ge=0, description="anneal β from 0 over these epochs")


class TrainConfig(_Strict):
    """Sampling, optimisation and checkpoints (method.md §5–6)."""

    epochs: int = Field(30, gt=0)
    batch_size: int = Field(512, gt=0, description="anchor cells per step (per worker)")
    n_views: int = Field(8, ge=2, description="anchor + neighbour views per anchor")
    neighbor_weighting: Literal["uniform", "snn", "distance"] = Field(
        "uniform", description="KNN views: uniform, ∝ shared-neighbour Jaccard (keeps a rare "
        "type's views inside it), or ∝ squared distance (reference code)")
    snn_prune: float = Field(1 / 15, ge=0, lt=1, description="snn: Jaccard ≤ this → weight 0 "
                             "(Seurat's prune.SNN)")
    min_cells_per_study: int = Field(64, gt=0)
    study_alpha: float = Field(1.0, ge=0, description="studies drawn ∝ size^alpha")
    small_studies: Literal["merge", "drop"] = Field(
        "merge", description="studies below min_cells_per_study: pool them or leave them out"
    )
    optimizer: Literal["adamw", "lars"] = "adamw"
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    final_lr_fraction: float = Field(0.0, ge=0, le=1, description="cosine decay floor")
    freeze_prototypes_steps: int = Field(0, ge=0)
    num_threads: int | None = Field(
        None, gt=0, description="torch threads (default: OMP_NUM_THREADS, else the node's "
        "cores / its workers)")
    deterministic: bool = Field(
        True, description="deterministic torch kernels: bit-identical reruns and resumes on CPU"
    )
    prefetch: int | None = Field(
        None, ge=0, description="batches built ahead in threads (default: 0 on ≤ 2 cores, else 2)"
    )
    progress: bool = True
    checkpoint_every_steps: int = Field(
        0, ge=0, description="also checkpoint mid-epoch every this many steps (0: epoch ends only)"
    )
    accumulate_steps: int = Field(
        1, gt=0, description="micro-batches per optimiser step (larger global batches)"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast of the networks (auto: bf16 on GPU, fp32 on CPU)"
    )
    compile: bool = Field(False, description="torch.compile the model")

    @field_validator("n_views")
    @classmethod
    def _views(cls, v: int) -> int:
        if v < 2:
            raise ValueError("n_views must be ≥ 2 (two assignment views)")
        return v


class DistributedConfig(_Strict):
    """How many training workers and who launches them (method.md §7).

    ``launcher="auto"``: inside ``torchrun`` (``WORLD_SIZE`` set) train under it; otherwise Ray
    Train when ``workers > 1`` or ``ray_address`` is set; otherwise in-process.
    """

    launcher: Literal["auto", "local", "torchrun", "ray"] = "auto"
    workers: int = Field(1, gt=0, description="DDP workers (Ray: one actor each)")
    ray_address: str | None = Field(None, description='existing Ray cluster, e.g. "auto"')
    use_gpu: bool | None = Field(None, description="one GPU per worker (default: if CUDA exists)")
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=-1, description="Ray restarts after worker failures (-1: ∞)")
    storage_path: str | None = Field(
        None, description="Ray run storage (shared FS / S3 on multi-node; default: OUT/ray)"
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU")
    timeout_s: int = Field(600, gt=0, description="a collective waiting longer is an error")


class EvaluateConfig(_Strict):
    """Evaluation of the atlas (method.md §9)."""

    enabled: bool = True
    max_cells: int = Field(50_000, gt=0, description="subsample for scIB / scGraph")
    scib: bool = True
    scgraph: bool = True
    umap: bool = True


class RunConfig(_Strict):
    """The whole job: ingest → prepare → train → export → evaluate."""

    seed: int = 0
    data: DataConfig
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    evaluate: EvaluateConfig = EvaluateConfig()



class ScGPCLConfig(_Strict):
    """scGPCL clustering (method.md §10; Lee et al. 2023, Bioinformatics)."""

    encoder: Literal["mlp", "graph"] = Field(
        "mlp", description="MLP over expression, or GraphSAGE over the bipartite cell–gene graph"
    )
    n_top_genes: int | None = Field(2000, gt=0, description="seurat_v3 HVGs if more genes")
    hidden_dims: list[int] = Field([256, 64], min_length=1)
    latent_dim: int = Field(32, gt=0)
    projection_dim: int = Field(32, gt=0, description="contrastive projection head output")
    mask_prob: float = Field(0.2, ge=0, lt=1, description="feature-masking probability per view")
    tau: float = Field(0.25, gt=0, description="NT-Xent and prototype temperature")
    granularities: list[float] = Field([1.0, 1.5, 2.0], min_length=1,
                                       description="k-means sizes as multiples of K")
    lambda_proto: float = Field(0.05, ge=0)
    lambda_zinb: float = Field(1.0, ge=0)
    zinb_genes_per_step: int | None = Field(
        256, gt=0, description="score the ZINB term on this many random genes per step (None: all)"
    )
    warmup_epochs: int = Field(10, ge=0, description="epochs before the prototype loss starts")
    pretrain_epochs: int = Field(100, gt=0)
    early_stop_ari: float | None = Field(
        0.99, gt=0, le=1, description="stop pre-training when consecutive k-means ARI exceeds this"
    )
    dec_max_epochs: int = Field(100, ge=0)
    dec_tol: float = Field(0.001, ge=0, description="stop DEC when this fraction of labels changes")
    gamma_dec: float = Field(1.0, ge=0, description="weight of KL(p‖q) against ZINB in DEC")
    dec_alpha: float = Field(1.0, gt=0, description="Student-t degrees of freedom")
    batch_size: int = Field(256, gt=1)
    lr: float = Field(1e-3, gt=0)
    dec_lr: float = Field(1e-4, gt=0)
    graph_neighbors: list[int] = Field([15, 10], min_length=1,
                                       description="graph encoder: neighbours sampled per hop in "
                                       "training (inference takes every gene of a cell on hop 1)")
    num_threads: int | None = Field(None, gt=0)


class ClusterDataConfig(_Strict):
    """Input and output of ``scproto-scale cluster``."""

    path: str = Field(description="h5ad file, AnnData zarr store or TileDB-SOMA experiment")
    label_key: str | None = Field(None, description="obs column of true labels (scoring only)")
    n_clusters: int | None = Field(None, gt=1, description="default: number of labels")


class ClusterJobConfig(_Strict):
    """``scproto-scale cluster CONFIG``: scGPCL on one dataset."""

    seed: int = 0
    data: ClusterDataConfig
    scgpcl: ScGPCLConfig = ScGPCLConfig()


class AnnotateHeadConfig(_Strict):
    """Supervised contrastive head h_ψ on a frozen embedding (MLP-CL / MLS-CL) and its classifier."""

    head: Literal["none", "mlp_cl", "mls_cl"] = "mlp_cl"
    classifier: Literal["logreg", "mlp"] = "logreg"
    tau: float = Field(0.1, gt=0, description="SupCon temperature")
    epochs: int = Field(100, gt=0)
    batch_size: int = Field(128, gt=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    num_threads: int | None = Field(None, gt=0)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ScprotoInputError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, model: type[BaseModel] = RunConfig) -> Any:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate.

    Args:
        path: YAML file (may be None when ``base`` is given).
        overrides: ``["train.epochs=5", "data.path=x.h5ad"]``; values are parsed as YAML.
        base: a dict used instead of / under the file.
        model: the top-level model (:class:`RunConfig`, or e.g. :class:`ClusterJobConfig`).

    Raises:
        ScprotoInputError: missing file, bad YAML, a malformed override, or a validation error
            (the message names every offending key, e.g. ``train.epoch: Extra inputs…``).
    """
    tree: dict = copy.deepcopy(base or {})  # overrides must not write into the caller's dict
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ScprotoInputError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ScprotoInputError(f"{p}: top level must be a mapping")
        tree.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ScprotoInputError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        lines = [
            f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            for err in e.errors()
        ]
        raise ScprotoInputError(
            f"invalid config{f' {path}' if path else ''}:\n" + "\n".join(lines)
        ) from None


class SurgeryConfig(_Strict):
    """Query mapping of unseen studies (scArches surgery as in scPoli; method.md §8).

    Only the new studies' condition-embedding rows and dispersion (θ) columns are trained; every
    reference parameter stays frozen and bit-identical.
    """

    epochs: int = Field(20, ge=0, description="passes over the query cells (0: untrained rows)")
    batch_size: int = Field(256, gt=1)
    lr: float = Field(5e-3, gt=0, description="AdamW learning rate of the new rows")
    kl_weight: float | None = Field(None, ge=0, description="β of the CVAE loss (default: model's)")
    lambda_swav: float = Field(
        0.0, ge=0, description="optional per-study SwAV against the frozen prototypes")
    chunk_size: int = Field(8192, gt=0, description="store rows read at a time")


class EmbedConfig(_Strict):
    """``scproto-scale embed``: stream a store through the frozen atlas (method.md §8)."""

    batch_key: str = Field(description="obs column of the study")
    chunk_size: int = Field(8192, gt=0, description="cells per chunk (the unit of resumption)")
    min_overlap: float = Field(0.8, ge=0, le=1, description="refuse below this gene overlap")
    workers: int = Field(1, gt=0, description="Ray actors over chunk ranges when > 1")
    ray_address: str | None = Field(None, description='existing Ray cluster, e.g. "auto"')
    label_column: str = Field("majority_label", description="metacells.h5ad obs label column")
    label_temperature: float = Field(
        0.05, gt=0, description="softmax temperature over prototype cosines for label transfer")


class CensusConfig(_Strict):
    """Which cells and genes of the CELLxGENE Census to train on (``pipelines/census.py``)."""

    census_version: str = Field("stable", description='Census release, e.g. "2025-01-30"')
    uri: str | None = Field(
        None, description="a SOMA experiment with the Census schema to use instead of the "
        "hosted Census (local copies, tests); default: cellxgene_census.open_soma")
    organism: str = Field("homo_sapiens", description="census_data experiment")
    measurement: str = "RNA"
    layer: str = Field("raw", description="X layer with raw counts")
    obs_value_filter: str = Field(
        "is_primary_data == True", description="SOMA value_filter on obs (tissue, assay, …)")
    genes: list[str] | None = Field(None, description="feature_ids to keep (default: all)")
    genes_file: str | None = Field(None, description="file with one feature_id per line")
    study_key: str = Field("dataset_id", description="obs column used as the study / batch")
    label_key: str | None = Field(None, description="obs column of cell types (evaluation)")


class CensusRunConfig(_Strict):
    """``scproto-scale census CONFIG``: train an atlas on a Census slice."""

    seed: int = 0
    census: CensusConfig = CensusConfig()
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
