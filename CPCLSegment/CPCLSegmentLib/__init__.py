"""CPCLSegmentLib: the CPCL semi-supervised segmentation engine.

Pure engine: torch, numpy, MONAI, SimpleITK and slicerio only. It never imports slicer, qt, vtk or ctk,
so it runs inside Slicer's Python, in a child process started by the Slicer module, and from a terminal.

Modules, bottom-up: each imports only modules listed above it (``Testing/test_layout.py`` checks that the
``imports:`` lists below are exactly what each module imports from the engine).

- ``errors``: error types and their exit codes (``CPCLError``, ``InputError``, ``ModelFileError``,
  ``OutOfMemory``, ``TrainingDiverged``, ``Cancelled``). imports: none.
- ``companions``: the files written beside a model file: resume checkpoint, run record, output lock
  (``checkpoint_path``, ``run_record_path``, ``lock_path``, ``is_checkpoint``, ``companion_paths``). imports: none.
- ``durations``: durations for people, one format for the command line and the panel (``format_seconds``).
  imports: none.
- ``jsonout``: strict JSON for every line and file the tool writes: non-finite numbers become null
  (``strict_json``, ``finite_or_none``). imports: none.
- ``cleanup``: what a run leaves on disk: temporary files removed at exit or on cancel, this run's checkpoint
  removed on cancel, outputs committed (never after a cancel) and named in the cancel message, and the sweep of
  dead runs' leftovers (``register``, ``remove_all``, ``commit``, ``remove_on_cancel``, ``cancel_report``,
  ``request_cancel``, ``sweep``). imports: errors.
- ``settings``: every training setting, every run option and shared choice, torch-free (``TrainConfig``,
  ``RunOptions``, ``PRESETS``, ``METHODS``, ``ANNOTATED_SLICES``, ``cli_settings``, ``run_options``). imports: errors.
- ``budget``: what a run's length can afford: the recipe for a time budget (too short for the semi-supervised
  recipe to pay off: a supervised warm start, or supervised-only) and the warning for a short run (``recipe_for_minutes``,
  ``short_run_warning``, ``minutes_to_pay_off``, ``minutes_for_warm_start``, ``supervised_only``). imports: settings.
- ``integrity``: damage checks for every file read: gzip CRC and length, the bytes a NIfTI header promises, ITK's
  whole reason on failure (``integrity_problem``, ``error_reason``, ``native_messages``, ``itk_read``).
  imports: errors.
- ``localmodels``: the MONAIAuto3DSeg models on this computer, torch-free, nothing downloaded
  (``find_auto3dseg_models``, ``auto3dseg_checkpoint``, ``read_labels_csv``, ``checkpoint_modality``). imports: errors.
- ``intensity``: intensity normalisation schemes, planned and applied (``plan_normalization``, ``normalize``,
  ``looks_like_ct``, ``foreground_intensity_sample``). imports: errors.
- ``io``: reading images and segmentations, verified (``read_image``, ``read_segmentation``, ``read_segment_list``,
  ``read_header``, ``check_exists``, ``strip_extension``, ``Segmentation``, ``ijk_to_lps_matrix``).
  imports: errors, integrity.
- ``labels``: segments onto the image grid (``build_label_array``, ``find_segment``, ``same_grid``,
  ``geometry_difference``, ``resample_label_to``). imports: errors, io.
- ``writers``: atomic, checked writes: temp + fsync + verify + rename, normal permissions, "no space left on <disk>"
  (``atomic_path``, ``verify_written``, ``check_free_space``, ``write_bytes``, ``write_json``, ``copy_file``,
  ``write_prediction``, ``write_seg_nrrd``, ``segments_box``, ``write_label_image``, ``write_image``). imports: cleanup, errors, integrity, io.
- ``preflight``: checks before any work: outputs against inputs, writable folders, free space, the output lock,
  stale stop files, spacing values, dead runs' leftovers (``check_outputs``, ``same_file``, ``check_free_space``,
  ``OutputLock``, ``check_stop_file``, ``check_spacing``, ``sweep_leftovers``). imports: cleanup, companions, errors,
  writers.
- ``precision``: compute precision per device: bf16 / fp16 + loss scaling / fp32 by CUDA compute capability,
  bf16 on CPUs with native bf16, never an autocast object for fp32 (``choose_precision``, ``Precision``,
  ``cuda_precision``, ``cpu_native_bf16``, ``autocast_context``). imports: none.
- ``backbones``: allow-listed MONAI networks returning ``(logits, features)`` through a decoder-stage hook
  (``MonaiBackbone``, ``ALLOWED``, ``make_spec``, ``check_spec``, ``adapt_state``, ``BackboneError``). imports: errors.
- ``network``: the VNet returning ``(logits, features)``; ``build_network`` builds it or an allow-listed MONAI
  backbone (``VNet``, ``build_network``). imports: backbones.
- ``data``: preprocessed cases, patch sampling and augmentation (``Case``, ``make_case``, ``PatchSampler``,
  ``Augmenter``, ``cached_case``, ``sample_locations``). imports: errors, settings.
- ``prototypes``: masked average pooling and cosine prototype maps, a network's class prototypes over labeled
  cases (``masked_average_pooling``, ``prototype_logits``, ``feature_masks``, ``labeled_prototypes``,
  ``IGNORE_INDEX``). imports: data, settings.
- ``losses``: one function per loss equation and one loss-term function per method (``supervised_loss``,
  ``forward_prototype_loss``, ``backward_prototype_loss``, ``consistency_loss``, ``copy_paste_terms``,
  ``total_loss``, ``StepInputs``, ``LOSS_TERMS``). imports: prototypes, settings.
- ``steplog``: a step's logged values kept on the device until the loop reads them one step later
  (``StepValues``, ``progress_event``). imports: none.
- ``teacher``: the EMA teacher (``make_teacher``, ``update_teacher``). imports: none.
- ``devices``: where the networks run; Apple MPS only after a one-step self-test (``choose_device``,
  ``resolve_device``, ``device_self_test``, ``MPS_MISSING_OPS``, ``MIN_MPS_TORCH``, ``describe_device``, ``is_oom``).
  imports: errors, losses, network, precision, settings, teacher.
- ``loader``: patch sampling in DataLoader worker processes, deterministic and resumable (``BatchMaker``,
  ``host_batches``, ``sampling_workers``). imports: data, settings.
- ``inference``: sliding-window probabilities of a network on an array (``predict_probabilities``,
  ``predict_labels``, ``class_argmax``). imports: network, precision.
- ``metrics``: Dice by voxel counting, HD95, mean Dice per class over cases (``dice_per_class``, ``confusion_counts``,
  ``dice_sums``, ``mean_dice``,
  ``mean_dice_over_cases``). imports: inference.
- ``distributed``: torchrun / DDP (``DistributedContext``). imports: errors.
- ``modelfile``: the model file and what lies beside it (``save_model``, ``load_model``, ``build_from_record``,
  ``make_record``, ``write_run_record``, ``plain``).
  imports: backbones, companions, errors, jsonout, network, writers.
- ``pretrained``: starting points for ``--init`` (our model files, Auto3DSeg checkpoints, MONAI bundles), segment
  matching and the weights to start from, the MONAIAuto3DSeg models on this computer (``read_starting_point``,
  ``starting_state``, ``match_segments``). imports: backbones, errors, localmodels, modelfile, network.
- ``prepcache``: the preprocessing cache on disk: an input file's identity (path, size, mtime), a case's key, the
  per-user folder and size limit, entries written atomically and verified on read, LRU trimming (``file_identity``,
  ``case_key``, ``canonical_path``, ``PREPROCESSING_VERSION``, ``PreprocessCache``, ``default_cache_dir``,
  ``parse_size``). imports: cleanup, errors.
- ``preparation``: a run's inputs before training: classes, sparse labels, fingerprint, preprocessing
  (``LabeledInput``, ``TrainRequest``, ``resolve_classes``, ``read_labeled``, ``inspect_cases``,
  ``model_input``, ``to_model_grid``, ``normalize``). imports: errors, intensity, io, labels, prepcache, settings.
- ``preprocessing``: a run's cases on the model grid through the preprocessing cache, in worker processes
  (``preprocess_cases``, ``open_cache``, ``cache_folder``, ``build_entry``, ``worker_count``). imports: cleanup,
  data, errors, io, prepcache, preparation, writers.
- ``planning``: spacing, patch, normalisation, memory and time; every case's grid at the target spacing
  (``plan_run``, ``plan_patch_size``, ``estimate_memory``, ``memory_budget``, ``check_memory``, ``check_grids``).
  imports: errors, io, network, precision, preparation, settings, writers.
- ``trainchecks``: a training request checked before any work: paths and values, every case's grid at the target
  spacing, the disk space the run needs (``check_request``, ``check_case_grids``, ``check_disk_space``).
  imports: companions, errors, io, planning, preflight, prepcache, preparation, preprocessing, settings.
- ``resume``: ``--resume``: the interrupted run a request continues and what it may change in it
  (``resume_checkpoint``, ``setting_flag``). imports: cleanup, companions, errors, modelfile,
  preparation, settings.
- ``trainer``: the training loop (``Trainer``, ``TrainResult``). imports: data, devices, distributed, errors, loader,
  losses, metrics, modelfile, network, planning, precision, prototypes, settings, steplog, teacher.
- ``pace``: seconds per iteration timed on real ``Trainer`` steps with the run's settings, the iterations that fit
  ``--minutes`` (``step_seconds``, ``run_seconds``, ``estimate_seconds``, ``iterations_for_minutes``,
  ``memo_timer``). imports: budget, data, errors, settings, trainer.
- ``prediction``: model file and images in, segmentations on each image's grid out (``Predictor``,
  ``back_to_image_grid``, ``predict``, ``compatibility_warnings``). imports: devices, errors, inference, io, labels,
  modelfile, preflight, preparation, writers.
- ``pipeline``: training orchestration, request in, model file out (``train``, ``compare_supervised``).
  imports: budget, cleanup, companions, data, devices, errors, metrics, modelfile, pace, planning, preflight,
  preparation, preprocessing, pretrained, resume, trainchecks, trainer.
- ``uncertainty``: "label this next" scores and ranking (``UncertaintyModel``, ``rank_files``).
  imports: errors, inference, io, modelfile, prediction, preflight, preparation, prototypes, settings, writers.
- ``inputfiles``: the CLI's other input files: case lists, Decathlon folders, colour tables, ``--config``
  (``read_case_list``, ``decathlon_cases``, ``load_config_file``). imports: errors, io, settings.
- ``demo``: ``cpcl-segment demo`` (``run_demo``). imports: companions, errors, inputfiles, io, labels, metrics,
  pipeline, prediction, preflight, preparation, settings, writers.
- ``cli_args``: the command line's parser and the training request it stands for (``build_parser``,
  ``build_train_request``, ``cache_settings``). imports: errors, inputfiles, prepcache, preparation, settings.
- ``console``: what the CLI prints and how it stops (``Reporter``, ``print_summary``, ``StopControl``).
  imports: cleanup, durations, errors, jsonout.
- ``childinfo``: what the Slicer module asks a child process, so its own never imports torch (``probe_environment``,
  ``model_info``, ``installed_versions``, ``nvidia_gpus``). imports: errors, jsonout, modelfile.
- ``jobs``: background child-process runs for the Slicer module (``Job``, ``probe_job``, ``model_info_job``).
  imports: errors.
- ``cli``: the ``cpcl-segment`` entry point and its commands (``main``, ``classify``, ``cmd_cache``). imports: cleanup,
  cli_args, console, demo, distributed, errors, modelfile, pipeline, planning, preflight, prediction, prepcache,
  uncertainty, writers.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Version of the model-file layout written by modelfile.save_model. Bump when fields change meaning.
MODEL_FORMAT = "cpcl-segment-model"
MODEL_FORMAT_VERSION = 2  # 2: a MONAI backbone (``backbones``); VNet model files are still written as 1
