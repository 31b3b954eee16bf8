"""Every ``slicer.*`` name this package calls, checked against Slicer 5.8's sources; ``missing_slicer_api()``
checks the running Slicer / slicer-core (in pytest and in the in-Slicer CPCLSegmentGlueTest)."""

from __future__ import annotations

from typing import Any, List

import slicer


# Every slicer.* name this package calls (checked against Slicer 5.8's sources; ``missing_slicer_api()`` checks the
# running Slicer / slicer-core, in pytest and in the in-Slicer CPCLSegmentGlueTest).
SLICER_API = (
    "vtkMRMLScalarVolumeNode.GetIJKToRASMatrix", "vtkMRMLScalarVolumeNode.SetIJKToRASMatrix",
    "vtkMRMLScalarVolumeNode.SetAndObserveImageData", "vtkMRMLScalarVolumeNode.GetParentTransformNode",
    "vtkMRMLScalarVolumeNode.CreateDefaultDisplayNodes", "vtkMRMLTransformNode.IsTransformToWorldLinear",
    "vtkMRMLTransformNode.GetMatrixTransformToWorld", "vtkMRMLVolumeArchetypeStorageNode.UseCompressionOff",
    "vtkMRMLVolumeArchetypeStorageNode.WriteData", "vtkMRMLVolumeArchetypeStorageNode.ReadData",
    "vtkMRMLSegmentationStorageNode.ReadData", "vtkMRMLSegmentationNode.SetReferenceImageGeometryParameterFromVolumeNode",
    "vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole", "vtkMRMLSegmentationNode.SetSourceRepresentationToBinaryLabelmap",
    "vtkMRMLSegmentationNode.CreateDefaultDisplayNodes", "vtkSegmentation.EXTENT_REFERENCE_GEOMETRY",
    "vtkSegmentation.ContainsRepresentation", "vtkSegmentation.CreateRepresentation", "vtkSegmentation.AddEmptySegment",
    "vtkSegment.GetTerminologyEntryTagName", "vtkSegment.GetTag", "vtkSegment.SetTag",
    "vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName", "vtkOrientedImageData",
    "vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry",
    "vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation",
    "vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode", "vtkMRMLSubjectHierarchyNode.SetItemParent",
    "vtkMRMLScalarVolumeDisplayNode.SetWindowLevelMinMax", "vtkMRMLScalarVolumeDisplayNode.ApplyThresholdOn",
    "vtkMRMLTableNode.RemoveAllColumns", "vtkMRMLTableNode.AddColumn", "vtkMRMLPlotSeriesNode.SetXColumnName",
    "vtkMRMLPlotSeriesNode.PlotTypeScatter", "vtkMRMLPlotSeriesNode.MarkerStyleNone", "vtkMRMLPlotSeriesNode.LineStyleDash",
    "vtkMRMLPlotChartNode.AddAndObservePlotSeriesNodeID", "vtkMRMLPlotChartNode.RemoveAllPlotSeriesNodeIDs",
    "vtkMRMLScene.GenerateUniqueName", "vtkMRMLScene.AddNewNodeByClass", "vtkSegmentationConverterFactory.GetInstance",
    "vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    "vtkMRMLSegmentationNode.SetNodeReferenceID", "vtkMRMLSegmentationNode.GetNodeReference",
    "vtkMRMLScene.GetFirstNode", "vtkMRMLScene.GetFirstNodeByName", "vtkMRMLScene.RemoveNode", "vtkMRMLScene.GetNodeByID",
    "vtkMRMLTableNode.GetTable", "vtkMRMLTableNode.StartModify", "vtkMRMLTableNode.EndModify",
    "vtkMRMLPlotChartNode.SetTitle", "vtkMRMLPlotChartNode.SetXAxisTitle", "vtkMRMLPlotChartNode.SetYAxisTitle",
    "vtkMRMLPlotChartNode.SetLegendVisibility", "vtkMRMLPlotSeriesNode.SetAndObserveTableNodeID",
    "vtkMRMLPlotSeriesNode.SetYColumnName", "vtkMRMLPlotSeriesNode.SetPlotType", "vtkMRMLPlotSeriesNode.SetMarkerStyle",
    "vtkMRMLPlotSeriesNode.SetLineStyle", "vtkMRMLPlotSeriesNode.SetColor", "vtkMRMLPlotSeriesNode.MarkerStyleCircle",
    "vtkMRMLPlotSeriesNode.LineStyleSolid", "vtkMRMLScalarVolumeDisplayNode.SetAndObserveColorNodeID",
    "vtkMRMLScalarVolumeDisplayNode.AutoWindowLevelOff", "vtkMRMLScalarVolumeDisplayNode.SetLowerThreshold",
    "vtkMRMLSubjectHierarchyNode.GetItemByDataNode", "vtkMRMLSubjectHierarchyNode.GetItemParent",
    "vtkSegmentation.GetSegment", "vtkSegmentation.GetNthSegmentID", "vtkSegmentation.GetNumberOfSegments",
    "vtkMRMLSegmentationNode.GetSegmentation", "vtkMRMLScalarVolumeNode.GetImageData",
    # segmentations handed to the child as their files (handoff.original_segmentation)
    "vtkMRMLSegmentationNode.GetModifiedSinceRead", "vtkMRMLSegmentationNode.GetStorageNode",
    "vtkMRMLSegmentationStorageNode.GetFileName", "vtkMRMLSegmentationStorageNode.GetNumberOfFileNames",
    "vtkSegmentation.GetSourceRepresentationName", "vtkSegmentation.GetLayerIndex",
    # segmentations handed over as a copy of their stored labelmap layer (segsnapshot.snapshot_segmentation)
    "vtkSegmentation.GetLayerDataObject", "vtkSegment.GetLabelValue", "vtkOrientedImageData.GetImageToWorldMatrix",
    "vtkOrientedImageData.GetExtent", "vtkMRMLSegmentationNode.GetParentTransformNode",
    # models in the scene, module outputs, the parameter node (panel.py)
    "vtkMRMLTextNode.SetText", "vtkMRMLTextNode.GetText", "vtkMRMLTextNode.SetForceCreateStorageNode",
    "vtkMRMLTextNode.CreateStorageNodeAlways", "vtkMRMLTextNode.AddDefaultStorageNode", "vtkMRMLTextStorageNode",
    "vtkMRMLScene.CreateNodeByClass", "vtkMRMLScene.AddNode", "vtkMRMLScene.GetSingletonNode", "vtkMRMLScene.GetNodesByClass",
    "vtkMRMLScene.IsImporting", "vtkMRMLScene.StartCloseEvent", "vtkMRMLScene.EndCloseEvent", "vtkMRMLScene.NodeAddedEvent",
    "vtkMRMLScene.NodeAboutToBeRemovedEvent", "vtkMRMLScriptedModuleNode.SetParameter", "vtkMRMLScriptedModuleNode.GetParameter",
    "vtkMRMLScriptedModuleNode.SetSingletonTag", "vtkMRMLScriptedModuleNode.SetAttribute", "vtkMRMLScriptedModuleNode.GetAttribute",
    "vtkMRMLScriptedModuleNode.SetNodeReferenceID", "vtkMRMLScriptedModuleNode.GetNodeReference",
    "vtkMRMLScriptedModuleNode.GetNodeReferenceID", "vtkMRMLScriptedModuleNode.AddNodeReferenceID",
    "vtkMRMLScriptedModuleNode.RemoveNodeReferenceIDs", "vtkMRMLScriptedModuleNode.GetNumberOfNodeReferences",
    "vtkMRMLScriptedModuleNode.GetNthNodeReference", "vtkMRMLScriptedModuleNode.StartModify",
    "vtkMRMLScriptedModuleNode.EndModify",
    # the model node and its hidden data node (modelnode.py), the chest CT sample (sampledata.py)
    "vtkMRMLTextNode.SetHideFromEditors", "vtkMRMLTextNode.StartModify", "vtkMRMLTextNode.EndModify",
    "vtkMRMLTextNode.SetNodeReferenceID", "vtkMRMLTextNode.GetNodeReference", "vtkMRMLTextNode.SetName",
    # the label -> train loop (panelloop.py), an output segmentation overwritten (results.py)
    "vtkSegment.GetLabelValue", "vtkSegment.GetRepresentation", "vtkMRMLSegmentationNode.RemoveAttribute",
    "vtkMRMLSegmentationNode.SetAttribute", "vtkMRMLSegmentationNode.StartModify", "vtkMRMLSegmentationNode.EndModify",
    # a closed-surface segmentation is converted in a copy (nodes.labelmap_copy)
    "vtkMRMLSegmentationNode.ApplyTransform", "vtkMRMLTransformNode.GetTransformBetweenNodes", "vtkSegmentation.DeepCopy",
    # a sequence's shown frame (nodes.sequence_browser_of)
    "vtkMRMLSequenceBrowserNode.IsProxyNodeID",
    # a result read on a worker thread, its segments added on the GUI thread (resultread.py)
    "vtkSegment", "vtkSegment.SetName", "vtkSegment.SetColor", "vtkSegment.SetLabelValue", "vtkSegment.SetNameAutoGenerated",
    "vtkSegment.SetColorAutoGenerated", "vtkSegment.AddRepresentation", "vtkSegmentation.AddSegment",
    "vtkSegmentation.RemoveAllSegments", "vtkSegmentation.SetSourceRepresentationName",
    "vtkSegmentation.DeserializeConversionParameters", "vtkOrientedImageData.SetImageToWorldMatrix",
)


def missing_slicer_api() -> List[str]:
    """The names of ``SLICER_API`` that this Slicer (or slicer-core) lacks."""
    missing = []
    for dotted in SLICER_API:
        obj: Any = slicer
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                missing.append(dotted)
                break
    return missing
