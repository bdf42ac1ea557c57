package snapshot

import (
	"context"
	"io"
	"log/slog"
	"os"
	"testing"

	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/testsuite"
)

// TestSuite runs containerd's own snapshotter test suite against the
// snapshotter, for ordinary snapshots.
func TestSuite(t *testing.T) {
	requireRoot(t)
	// Named as overlayfs: the suite tailors one case (renaming a lower
	// directory) to the snapshotter's name, and ordinary snapshots are
	// containerd's overlay ones.
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := New(ctx, root, newFakeFS(), slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			return nil, nil, err
		}
		return sn, sn.Close, nil
	})
}

// requireRoot skips tests that mount overlayfs when not root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root to mount overlayfs")
	}
}
