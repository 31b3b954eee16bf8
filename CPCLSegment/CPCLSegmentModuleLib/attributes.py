"""The node attributes the module sets (``CPCLSegment.*``) and its node reference role, named once. Every node
the module creates carries ``OUTPUT`` (what it is); a model node carries the rest (``modelnode``, ``models``)."""

OUTPUT = "CPCLSegment.Output"  # what a node the module created is (``scene.OUTPUT_*``): never picked as an input
FILE = "CPCLSegment.File"  # a model node: its model file on disk (a cache of the data node's payload)
SHA256 = "CPCLSegment.SHA256"  # a model node: the SHA-256 of its model file's bytes
BYTES = "CPCLSegment.Bytes"  # a model node: the size of its model file in bytes
CREATED = "CPCLSegment.Created"  # a model node: when it was made ("%Y-%m-%d %H:%M:%S")
CLASSES = "CPCLSegment.Classes"  # a model node: its classes as JSON (names, colours, label values)
NESTED = "CPCLSegment.Nested"  # a model node: its overlap nesting as JSON ({earlier: [later, ...]})
SUMMARY = "CPCLSegment.Summary"  # a model node: its training summary as JSON (segments, status, iterations, method)
RUN_DIR = "CPCLSegment.RunDir"  # a model node: the training run folder it came from (what resume updates)
# An uncertainty map's node reference to the volume it was computed for (a reference follows ID changes).
SOURCE_VOLUME_ROLE = "CPCLSegment.SourceVolume"
