package peer

// PieceSizeOf is the piece size a download cuts its task into.
func PieceSizeOf(d *Download) int64 { return d.t.psize }
