"""The offline tools' library: turning face datasets into shards. Training never imports it.

    sources.py    what is read: a class-per-folder tree, insightface RecordIO, landmark files
    tree.py       listing a class-per-folder tree: links followed only out of the tree
    recordio.py   the RecordIO reader (no mxnet)
    align.py      five-point similarity alignment onto the 112x112 template
    packing.py    pack: shuffle, cut into shards, write in parallel, resumable
    outdir.py     the output folder: one packer at a time (lock), not inside the source, one plan
    indexing.py   the per-sample index (for P×K batches): built by pack and ``pack_shards.py index``, checked
    verify.py     verify_shards: every sample of a shard set checked against its manifest
    synthetic.py  procedural face-like identities for demos and tests
    synthetic_ijb.py  a small IJB-B/C root of such faces in insightface's layout (loose crops, meta/)
"""
from pfc.datasets.packing import PackOptions, pack
from pfc.datasets.sources import FolderSource, RecordSource
from pfc.datasets.synthetic import write_synthetic
from pfc.datasets.verify import verify_shards

__all__ = ["pack", "PackOptions", "FolderSource", "RecordSource", "verify_shards", "write_synthetic"]
