"""Which module of an ultralytics model an exported ONNX node belongs to (node names carry the module scope)."""

from __future__ import annotations


def module_for_node(model, node_name: str):
    """(module path, module) of the ultralytics module an exported ONNX node belongs to, or (None, None).

    The exporter names nodes by module scope: '/model.23/cv2.0/cv2.0.2/Conv' is model.23.cv2.0.2 (a nested
    container repeats its parent's name as a prefix); 'm_1' is the second call of module 'm'.
    """
    segs = node_name.strip("/").split("/")[:-1]
    if not segs:
        return None, None
    cur, prev, path = model, None, []
    for seg in segs:
        found = None
        cands = [seg]
        if prev is not None and seg.startswith(prev + "."):
            cands.insert(0, seg[len(prev) + 1:])
        head, _, tail = seg.rpartition("_")
        if head and tail.isdigit():
            cands.append(head)
        for c in cands:
            try:
                found = cur.get_submodule(c)
            except AttributeError:
                continue
            path.append(c)
            break
        if found is None:
            return None, None
        cur, prev = found, seg
    return ".".join(path), cur
