"""CPCLSegmentModuleLib: the Slicer module's Qt-free logic (imports ``slicer`` and ``vtk``, never ``qt``, ``ctk`` or
``torch``), tested with pytest against slicer-core. A package, not top-level files: Slicer loads every top-level
``.py`` of a module folder as a module.

Modules, bottom-up: each imports only modules listed above it (``Testing/test_layout.py`` checks that the
``imports:`` lists below are exactly what each module imports from this package).

- ``attributes``: the node attributes the module sets (``CPCLSegment.*``) and its node reference role, named once
  (``OUTPUT``, ``FILE``, ``SHA256``, ``BYTES``, ``CREATED``, ``CLASSES``, ``NESTED``, ``SUMMARY``, ``RUN_DIR``,
  ``SOURCE_VOLUME_ROLE``). imports: none.
- ``slicer_api``: every ``slicer.*`` name the package calls, and which of them this Slicer lacks (``SLICER_API``,
  ``missing_slicer_api``). imports: none.
- ``options``: the module's run options and the ``--config`` mapping for the engine (``module_settings``,
  ``DEFAULT_MINUTES``, ``split_settings``, ``option_args``, ``train_config``, ``compares_supervised``). imports: none.
- ``environment``: package versions from metadata, the child's device report, installing dependencies
  (``check_requirements``, ``describe_backend``). imports: none.
- ``nodes``: reading the scene's nodes: voxels, geometry, segments and their masks on a volume's grid
  (``RAS_TO_LPS``, ``node_name``, ``check_volume``, ``volume_array``, ``world_ijk_to_ras``, ``segment_names``, ``find_segment_id``,
  ``segment_masks``, ``labeled_arrays``, ``sequence_browser_of``). imports: none.
- ``scene``: the user's cases and volumes in the scene and the module's own outputs (``LabeledCase``,
  ``as_cases``, ``is_module_output``, ``new_output_node``, ``output_for``, ``segmented_volume_pairs``,
  ``volumes_without_segmentation``). imports: attributes, nodes.
- ``livevolume``: a volume made in the scene captured at the click without a copy (a view of its voxels, its image
  data's modification time and geometry) and compared with its node once written (``LiveVolume``, ``capture``,
  ``unchanged``). imports: nodes.
- ``handoff``: volumes and segmentations handed to the child: the original file of a node unchanged since it was
  read, else a file written from a worker thread from the captured voxels and checked on the GUI thread (written
  again where the node changed meanwhile); a job that starts once its files are written and checked
  (``original_file``, ``original_segmentation``, ``write_snapshot``, ``write_then_rename``, ``write_seg_nrrd_kji``,
  ``Handoff``, ``PreparedJob``). imports: livevolume, nodes.
- ``segsnapshot``: a segmentation made or edited in the scene handed to the child: the stored labelmap layers that
  hold its selected segments held without a copy on the GUI thread (several layers: on the volume's grid, segments
  and overlaps counted on the views), merged and written as a ``.seg.nrrd`` from a worker thread, compared with the
  node before the child starts (``SegmentationSnapshot``, ``snapshot_segmentation``, ``merged``,
  ``write_segmentation_snapshot``, ``unchanged``, ``hand_over``). imports: handoff, nodes.
- ``inputcheck``: the input check before training, pure: writes nothing (``check_inputs``, ``CheckResult``,
  ``CheckFailed``). imports: handoff, nodes, scene, segsnapshot.
- ``export``: scene -> files: volumes, segments, a run's inputs checked in one pass and handed over (originals or
  files written later) (``export_volume``, ``write_segments``, ``export_segmentation``, ``export_inputs``,
  ``ExportedInputs``). imports: handoff, inputcheck, nodes, scene, segsnapshot.
- ``resultread``: a result ``.seg.nrrd`` read on a worker thread into what Slicer's storage node makes of it (one
  image per layer, one segment each), its segments added to a node on the GUI thread (``ReadResult``, ``read_result``,
  ``add_segments``). imports: nodes.
- ``results``: files -> NEW nodes; a segmentation job's results read on a worker thread as the child reports them
  (``import_segmentation``, ``read_segmentation_result``, ``ResultImports``, ``import_scalar_volume``,
  ``empty_segmentation``, ``nest_segments``). imports: attributes, export, nodes, resultread, scene.
- ``modelnode``: a model as a node with a short text plus a hidden data node holding the file, so no view renders
  the payload (``payload_node``, ``model_bytes``, ``file_matches``, ``upgrade_model_node``, ``remove_model``,
  ``describe``). imports: attributes, scene.
- ``models``: models kept in the scene (``store_model``, ``is_model_node``, ``model_file_of``,
  ``model_node_from_file``, ``save_model_file``, ``model_summary``, ``model_nested``).
  imports: attributes, modelnode, nodes, scene.
- ``modellist``: the models as a list (rename, delete, keep only the latest) and the run folders, listed and
  removable (``model_rows``, ``rename_model``, ``keep_latest``, ``run_folders``, ``remove_run_folders``).
  imports: attributes, modelnode.
- ``rounds``: the label -> train loop's rounds: the held-out Dice change, where an added case goes
  (``round_record``, ``dice_change``, ``order_cases``). imports: none.
- ``sampledata``: the chest CT and its segmentation as Slicer Sample Data (``sample_files``, ``load_sample``,
  ``registration``, ``register``, ``register_with_slicer``). imports: none.
- ``trainrun``: a training run's folder, command line and what stays of it (``write_training_run``,
  ``train_command``, ``read_command``, ``can_resume``, ``collect_model``, ``keep_run_dir``,
  ``refuse_second_training``). imports: attributes, export, inputcheck, models, options, scene.
- ``plot``: the training plot in MRML table and plot nodes (``TrainingPlot``). imports: none.
- ``logicmodels``: the train / segment / rank API's models: model files for the child, model nodes from files and back, a model's
  classes (``ModelAPI``, ``ModelRef``). imports: models, results.
- ``logic``: the one train / segment / rank API the console and the panel call (``LogicCore``).
  imports: handoff, logicmodels, models, nodes, options, results, scene, trainrun.
- ``panelguard``: what the panel holds back or asks first: typing is never overwritten by a refresh
  (``write_into_widget``, ``widget_value``, ``same_value``), Reload / exit ask while jobs run (``leave_question``,
  ``LeaveQuestion``), where "Save model..." opens (``model_save_path``). imports: none.
- ``panelsettings``: the panel's settings in the parameter node (``PanelSettings``, ``panel_options``,
  ``setting_names``).
  imports: options.
- ``panelstate``: the panel's cases, segments, volumes and model in the parameter node (``PanelState``,
  ``parameter_node``). imports: models, nodes, scene.
- ``panelloop``: the label -> train loop in the panel: the segmentation Label next opened, "Add as labeled case",
  the rounds' held-out Dice (``PanelLoop``, ``painted``). imports: attributes, nodes, rounds, scene.
- ``startfrom``: the panel's "Start from" choice: nothing, a scene model, a file or folder, the MONAIAuto3DSeg
  models on this computer; it becomes the run's --init (``PanelStart``, ``choice_rows``). imports: modellist.
- ``panelmanage``: the panel's output segmentation (new or overwritten), Show in 3D, the model list and the run
  folders (``PanelManage``, ``size_text``). imports: modellist, nodes.
- ``packageinfo``: the package view beside the Install button: installed versions against the ones needed, the
  training process's Python and PyTorch build (``PanelPackages``, ``package_rows``). imports: environment.
- ``panelview``: what the panel shows (``PanelView``, ``build_view``, ``model_text``, ``check_text``,
  ``train_event_display``). imports: environment, inputcheck, models, panelsettings, trainrun.
- ``paneljobs``: the panel's running jobs, their events and results, scene close (``PanelJobs``).
  imports: attributes, logic, panelview, plot.
- ``panel``: ``PanelController``, every decision the panel makes (the widget maps its ``view()`` to Qt)
  (``PanelController``, ``error_text``). imports: environment, inputcheck, logic, nodes, packageinfo, paneljobs,
  panelloop, panelmanage, panelsettings, panelstate, panelview, plot, scene, startfrom.
"""
