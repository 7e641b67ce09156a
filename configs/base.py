"""Shared defaults of every experiment; each config file changes a few fields on top."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "finetune"  # "finetune" (property regression) or "pretrain" (denoising)
    c.seed = 123
    c.num_devices = 0  # 0: every visible accelerator
    c.distributed = False  # multi-host: call jax.distributed.initialize()
    c.init_checkpoint = ""  # fine-tuning: a pre-training workdir whose encoder to start from

    c.data = ml_collections.ConfigDict()
    c.data.path = "data/jarvis_dft3d.jsonl.gz"
    c.data.task = "formation_energy_peratom"
    c.data.units = "auto"  # "auto": from the task table in dpf_jax/data/pipeline.py
    c.data.target_transform = "auto"  # "", "log10", or "auto" (log10 for MP K_VRH/G_VRH)
    c.data.val_fraction = 0.05  # pre-training corpus: held-out share for validation
    # labelled data whose records store no split for the task: (val, test) shares of a split by
    # a hash of the record id (the same for every seed); stored splits are used as they are
    c.data.split_fractions = (0.1, 0.1)
    c.data.cache_dir = ".cache/graphs"
    c.data.num_workers = 0  # graph building processes; 0 = all cores
    c.data.max_records = 0  # 0 = all; smoke runs use a few hundred (pre-training: a random subset)

    c.graph = ml_collections.ConfigDict()
    c.graph.cutoff = 8.0
    c.graph.max_neighbors = 12
    c.graph.use_lattice = True
    # Edges that carry the same message (same receiver, sender and length) processed once with a
    # count: the same model output and gradients (float rounding aside), fewer edges per step.
    # "mirror": an atom's self-images n and -n (70-74% of the edges remain on the shipped data);
    # "distance": all such groups (JARVIS 47%, MP 60%, pre-training corpus 48%); "atoms": also
    # atoms with equal neighbourhoods computed once (JARVIS 33%, MP 30%; property regression
    # only); "none": the reference list. "auto" takes the most that is exact for the run:
    # "atoms" for fine-tuning, "distance" for pre-training, "mirror" with position noise or
    # lattice noise applied by the step. See dpf_jax/data/graphs.py (merge_equivalent_edges).
    c.graph.merge_edges = "auto"

    c.model = ml_collections.ConfigDict()
    c.model.num_layers = 5
    c.model.channels = 128
    c.model.heads = 4
    c.model.rbf_bins = 128
    c.model.cutoff = 8.0
    c.model.dtype = "float32"
    # Matmul precision: "default" (JAX's float32 default: TF32 on recent NVIDIA GPUs),
    # "highest" (true float32), or "bf16" (bfloat16 activations, float32 params and loss).
    c.model.precision = "default"
    # MatformerConv arrangement, same parameters and maths: "node" applies the per-node parts
    # of the edge Denses before the gather (fewer FLOPs), "edge" gathers node features first
    # (more FLOPs, much smaller gathers); see dpf_jax/model/layers.py and scripts/results/PERF_NOTES.md.
    c.model.formulation = "node"
    # How the per-edge message chain runs, same parameters and maths: "auto" (default: on a GPU
    # per padded budget the fastest measured, "pallas_gate_rows-16x8x4-keep-joint-mres-sorted-slots-slotsum", below
    # 16,384 edges "pallas_gate_rows-16x8-keep-joint-mres-sorted"; elsewhere "xla"; dpf_jax/model/layers.py
    # resolve_edge_kernel), "xla" (jax.numpy), "pallas_gate_rows" (node formulation: the gate
    # alpha -> LayerNorm -> sigmoid -> x upd as one Triton kernel pair that gathers the node-table
    # rows itself, matmuls in XLA; dpf_jax/model/gate_kernel.py), "pallas_gate" (the same gate on
    # gathered tables XLA writes first), "pallas" (the chain incl. msg_layer_0 as one kernel pair;
    # dpf_jax/model/edge_kernel.py), "pallas_node" (node formulation: the gathers and e @ W3 in
    # the kernels too; dpf_jax/model/gather_kernel.py); "-16x8" appended sets the tile (edges
    # per program x warps), and "-16x8-keep" for the gate kernels keeps q, qk, k, e in registers
    # instead of reloading them (slower alone, session 17; faster with "-joint-mres", session 28,
    # in the "auto" choice); "pallas_gate_rows-16x8-atomic" sums the node
    # tables' gradients inside the backward kernel instead of XLA's scatter-adds (slower, session
    # 18), "-sorted" sums them per node with a segment kernel, each node's run of edges (faster,
    # session 19: in every "auto" choice), "-sorted-runs" sums the receiver side in the backward kernel
    # itself (faster on the synthetic benchmark, slower on the real corpus, session 24); a third
    # tile number sets the backward-pass kernels' warps ("pallas_gate_rows-16x8x4-sorted-runs"),
    # and "-sum" last runs msg_layer_1 and the receiver sums as one kernel pair (session 25,
    # dpf_jax/model/message_sum_kernel.py); "-slots" / "-slotsum" sum per edge block instead
    # (session 27); before "-sorted", "-joint" takes e and e @ W3 as one matmul's [E, H, 4C]
    # output and "-mres" lets the backward read the forward's output instead of upd (session 28).
    # "xla_recompute" (node formulation): the gate in jax.numpy with a
    # written backward that stores no per-edge intermediate (dpf_jax/model/gate_recompute.py).
    c.model.edge_kernel = "auto"
    # Backward-pass rematerialisation per layer (same parameters and maths; speed / memory):
    # "none", "layer" (keep only layer inputs), "dots" (keep matmul outputs), "dots_no_batch",
    # "gate" / "gate_lean" / "stats" (matmul outputs plus named per-edge tensors; "stats" is the
    # memory saver: -38% peak memory at the same speed on real pre-training batches, H100);
    # see REMAT_POLICIES in dpf_jax/model/matformer.py.
    c.model.remat = "none"
    # How BatchNorm combines its training statistics over devices: "gathered" (each device's count,
    # mean and squared deviations in one all-gather, combined exactly) or "two_pass" (psum the
    # sums, then the squared deviations from the global mean): the same numbers up to float32
    # rounding; "gathered" has one collective per BatchNorm in each direction instead of two
    # (dpf_jax/model/layers.py MaskedBatchNorm; measured in the README's multi-GPU section).
    c.model.batch_norm_stats = "gathered"
    # Each layer's e @ W3 (the edge's part of lin_msg_update) as edge_attr @ (W_e W3), lin_edge's
    # kernel folded in per head: same parameters and FLOPs, ~6-7 KB less memory traffic per edge
    # and layer, float sums associated differently. "auto": wherever the layer computes e @ W3
    # itself ("node" formulation, any edge kernel but pallas_node); True (an error elsewhere) or
    # False. Session 23, one H200: issue #9's synthetic fine-tuning step 21.81 -> 20.94 ms, the
    # first-epoch pre-training loss within ~1.0e-4 of the unfolded curve (PERF_NOTES.md).
    c.model.fold_edge_weights = "auto"

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.weight_decay = 1e-5
    c.optim.pct_start = 0.3
    c.optim.div_factor = 25.0
    c.optim.final_div_factor = 1e4
    c.optim.cycle_momentum = True
    c.optim.base_momentum = 0.85
    c.optim.max_momentum = 0.95
    c.optim.clip_norm = 5.0
    # run the optimiser update on one flat vector of all parameters (optax.flatten): the same
    # maths (the clipping norm sums in another order), ~300 fewer small kernels per step than
    # one update per parameter leaf (113 of them); a resumed run keeps its saved layout
    c.optim.flatten = True

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 500
    c.train.batch_size = 32
    c.train.standardize_targets = True
    c.train.eval_every_epochs = 1
    c.train.log_every_steps = 20
    c.train.checkpoint_every_steps = 0  # >0: also save mid-epoch every this many steps
    # latest checkpoint at an epoch end at most this often (and always at the end, on
    # SIGTERM / Ctrl-C and at max_steps); 0: every epoch. Saves cost ~1 s each.
    c.train.checkpoint_every_secs = 120
    c.train.max_steps = 0  # >0: stop (and checkpoint) there, as if interrupted; rerun resumes
    # JAX's persistent compilation cache for `python -m dpf_jax.main` / multirun (relative to the
    # working directory; "": off; the environment's JAX_COMPILATION_CACHE_DIR wins): a rerun, a
    # resumed run or a sweep's next run with the same padded shapes skips their compilations
    c.train.compilation_cache_dir = ".cache/jax"
    # padded (nodes, edges) shapes per run, each one jit compilation (data/batching.py
    # choose_budgets), placed by "cost": the least mean padded size over simulated batches
    # ("quantile": at the k/levels quantiles, the placement up to session 21). Issue #9's synthetic
    # fine-tuning B=256 on one H100 (session 22): quantile x 2 levels 29.35 ms per step (11.1% of
    # edge slots padding), cost x 2 28.21, x 3 27.47, x 4 26.60 (2.3%); each level ~27 s to compile there.
    # Session 31 (one H200, same benchmark): x 4 17.77 ms, x 8 17.55 (1.3%); over 200 epochs
    # 3.8% -> 1.9% padding edges (x 8 uses 7 shapes there: ~60 s more compilation, once)
    c.train.num_budget_levels = 8
    # at most this many for the validation / test batches and for prediction: forward-only
    # steps, where a compilation costs more than the padding it saves
    c.train.eval_budget_levels = 4
    c.train.budget_placement = "cost"
    # split each global batch over the devices by edge count (heaviest crystal first to the
    # lightest share), so the edge padding stays near its one-device level
    c.train.balance_shares = True
    # >0: try this many padded edge counts per budget level (the level's own, then the next
    # multiples of budget_search_granule) and keep the one whose compiled training step XLA
    # counts the fewest bytes for: on a GPU the same batch can step 20-30% faster at a slightly
    # larger padded shape (dpf_jax/train/budget_search.py). Costs that many compilations.
    # (with eight budget levels that is eight searches, also for levels no batch may reach)
    c.train.budget_search = 0
    c.train.budget_search_granule = 1024
    c.train.budget_search_cache = ".cache/budget_search.json"  # byte counts found ("": none)
    c.train.budget_search_threads = 4  # candidate compilations run at once
    # >=0: XLA's GPU autotune level for the candidate compilations only (0: none: the search then
    # took 32 s instead of 85-92 s on an H200 and chose the same shapes); -1: the compiler's default
    c.train.budget_search_autotune_level = 0
    c.train.prefetch = 2
    # the host waits whenever more steps than this are queued on the devices: a SIGTERM /
    # Ctrl-C then stops within this many steps (0: no limit; the host may run up to
    # log_every_steps steps ahead)
    c.train.steps_in_flight = 2
    # the jitted step takes the state as one vector per dtype (3 arrays) instead of
    # 141 leaves (train/step.py StatePacking): the host's cost per step falls with the leaf count
    c.train.pack_state = True
    # and the batches as three int32 arrays (nodes, edges, graphs) instead of 16-17 (data/transfer.py)
    c.train.pack_batches = True
    # and each step's metrics as one vector, fetched in one copy instead of ~9 (train/step.py)
    c.train.pack_metrics = True
    # with optim.flatten: the optimiser, the parameter update and the skip of a non-finite step on
    # the concatenated parameters, split into leaves once at the end (train/step.py
    # train_step_fn), instead of one add and select per parameter leaf; the same numbers
    c.train.flat_update = True
    # how XLA's CUDA graphs run the training step's kernels (train/parallel.py; changes no number):
    # "xla" keeps XLA's defaults; "concurrent" lets independent kernels overlap;
    # "concurrent_collectives" also puts the collectives in the graphs; "auto" (default) picks
    # concurrent_collectives on several GPUs, concurrent on one GPU for batches of <= 128
    # crystals, else xla (and xla off a GPU). Timed (session 21, H200s): pre-training B=256 on 4
    # GPUs 4.12 -> 3.56 ms per step (concurrent), 3.23 (concurrent_collectives, another machine);
    # JARVIS fine-tuning B=32 on one 1.82 -> 1.37 ms. Loss curves (session 22, 2 x H200): 1 vs 2
    # GPUs within 1.03e-4, concurrent vs xla within 9.1e-5 (pre-training); fine-tuning B=32 over 23
    # steps 4.5e-4, two xla runs of one seed 5.7e-4 (first 10 steps: 3.9e-4 against 2.0e-4).
    c.train.cuda_graphs = "auto"
    c.train.progress_bar = True

    c.pretrain = ml_collections.ConfigDict()
    # "paper": the paper's equations, fresh noise each step from the fields below (default);
    # "official": the authors' released code (configs/pretrain_official.py,
    # dpf_jax/tasks/official.py): fixed noise drawn once per structure, the fields below unused.
    c.pretrain.corruption = "paper"
    c.pretrain.mask_fraction = 0.0
    c.pretrain.position_scale = 0.0
    c.pretrain.position_fraction = 1.0
    c.pretrain.lattice_scale = 0.0
    c.pretrain.rebuild_topology = False
    c.pretrain.type_weight = 1.0
    c.pretrain.position_weight = 1.0
    c.pretrain.lattice_weight = 1.0
    return c
