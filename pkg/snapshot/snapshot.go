// Package snapshot is starling's containerd snapshotter: containerd's own
// overlay snapshotter for ordinary layers, plus remote snapshots — layers
// mounted by a FileSystem (lazily, through FUSE) and reported to containerd
// as already present, so that it skips download and unpack.
//
// The snapshotter knows nothing of how a remote layer is fetched: it hands
// the labels containerd sent to its FileSystem, as the reference
// stargz-snapshotter does.
//
// Across a restart of starlingd: every remote snapshot is unmounted on
// shutdown and mounted again at the same place on start, so containers
// created after the restart start normally. A container that was running
// while starlingd was down sees its lower layers disappear (reads of files
// not yet in the page cache fail with ENOTCONN or EIO) until starlingd is
// back; it does not recover the mounts it already holds, and should be
// restarted. Keeping the FUSE sessions alive across restarts is future work.
package snapshot

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"sync"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
)

// FileSystem mounts remote layers; the snapshotter knows nothing else of them.
// labels are those containerd passed to Prepare (and, after a restart, those
// stored on the committed snapshot, which include them).
type FileSystem interface {
	// Mount mounts the layer the labels name at mountpoint. An error that
	// wraps ErrNotRemote says the layer is not one to mount remotely.
	Mount(ctx context.Context, mountpoint string, labels map[string]string) error
	// Check reports whether the layer at mountpoint still serves.
	Check(ctx context.Context, mountpoint string, labels map[string]string) error
	// Unmount unmounts mountpoint and ends all work of its layer; unmounting
	// what is not mounted is not an error.
	Unmount(ctx context.Context, mountpoint string) error
}

// Resolver may be implemented by a FileSystem that can tell whether a
// layer can be mounted before the snapshotter makes a snapshot for it, and
// get it ready (and the image's other layers with it: containerd prepares
// them one after another). A layer it refuses takes the ordinary path at no
// cost; one it accepts is followed by Mount with the same labels, and the
// FileSystem ends on its own a readiness that no Mount consumes.
type Resolver interface {
	Resolve(ctx context.Context, labels map[string]string) error
}

// ErrNotRemote is wrapped by FileSystem errors for a layer that is not
// meant to be mounted remotely (not a lazy format, labels missing): its
// fallback is expected rather than a failure.
var ErrNotRemote = errors.New("layer cannot be mounted remotely")

// Labels starling keeps on a committed remote snapshot, to mount it again
// after a restart.
const (
	labelTargetSnapshot = "containerd.io/snapshot.ref"
	// labelRemoteSnapshot marks a remote snapshot for tools that ask (the
	// reference stargz-snapshotter sets it the same way).
	labelRemoteSnapshot = "containerd.io/snapshot/remote"
	labelRemote         = "containerd.io/snapshot/starling.remote"
	labelMountpoint     = "containerd.io/snapshot/starling.mountpoint"
)

var (
	metricRemote = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "starling_snapshot_remote_total",
		Help: "Layers mounted lazily.",
	})
	metricFallback = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "starling_snapshot_fallback_total",
		Help: "Layers that went the ordinary way (downloaded and unpacked), by reason.",
	}, []string{"reason"})
)

func init() { prometheus.MustRegister(metricRemote, metricFallback) }

// restoreParallel bounds the remote snapshots mounted again at once on
// start: each costs a round trip to the registry.
const restoreParallel = 8

// Snapshotter implements snapshots.Snapshotter and snapshots.Cleaner.
type Snapshotter struct {
	snapshots.Snapshotter // containerd's overlay snapshotter
	fs                    FileSystem
	log                   *slog.Logger

	mu sync.Mutex
	// remote holds the mountpoint of every remote snapshot this process
	// knows of, and whether it is mounted; one whose mount failed stays,
	// for Check to mount it again.
	remote    map[string]bool
	remounts  map[string]chan struct{} // mountpoint -> remount in progress
	closed    bool
	closeOnce sync.Once
	closeErr  error
}

// New opens the snapshotter under root and mounts again the remote
// snapshots it had; one that fails to mount is logged and stays.
func New(ctx context.Context, root string, fs FileSystem, log *slog.Logger) (*Snapshotter, error) {
	inner, err := overlay.NewSnapshotter(root, overlay.AsynchronousRemove)
	if err != nil {
		return nil, fmt.Errorf("overlay snapshotter at %s: %w", root, err)
	}
	if log == nil {
		log = slog.Default()
	}
	s := &Snapshotter{
		Snapshotter: inner,
		fs:          fs,
		log:         log,
		remote:      map[string]bool{},
		remounts:    map[string]chan struct{}{},
	}
	if err := s.restore(ctx); err != nil {
		inner.Close()
		return nil, err
	}
	return s, nil
}

// Prepare creates an active snapshot; for a layer the FileSystem mounts
// remotely it commits the layer as the target and says it already exists.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	if target := base.Labels[labelTargetSnapshot]; target != "" {
		s.log.Debug("prepare", "key", key, "parent", parent, "layer", base.Labels[snapshotters.TargetLayerDigestLabel])
		if done, err := s.prepareRemote(ctx, key, parent, target, base.Labels, opts); done {
			return nil, err
		}
	}
	if err := s.checkChain(ctx, parent); err != nil {
		return nil, err
	}
	return s.Snapshotter.Prepare(ctx, key, parent, opts...)
}

// prepareRemote makes the remote snapshot target on parent. done says that
// err is Prepare's answer; otherwise the layer takes the ordinary path.
func (s *Snapshotter) prepareRemote(ctx context.Context, key, parent, target string, labels map[string]string, opts []snapshots.Opt) (done bool, err error) {
	exists := fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
	layerDigest := labels[snapshotters.TargetLayerDigestLabel]
	if info, err := s.Snapshotter.Stat(ctx, target); err == nil {
		if info.Kind != snapshots.KindCommitted || info.Parent != parent {
			s.fallback(labels, fmt.Errorf("snapshot %q exists with another parent or kind", target))
			return false, nil
		}
		if info.Labels[labelMountpoint] != "" {
			if err := s.check(ctx, info); err != nil {
				return true, err
			}
		}
		return true, exists
	} else if !errdefs.IsNotFound(err) {
		return true, err
	}
	if r, ok := s.fs.(Resolver); ok {
		if err := r.Resolve(ctx, labels); err != nil {
			s.fallback(labels, err)
			return false, nil
		}
	}
	mounts, err := s.Snapshotter.Prepare(ctx, key, parent, opts...)
	if err != nil {
		// What the ordinary path would answer too.
		return true, err
	}
	dir, err := fsDir(mounts)
	if err != nil {
		if rerr := s.Snapshotter.Remove(ctx, key); rerr != nil {
			return true, errors.Join(err, rerr)
		}
		s.fallback(labels, err)
		return false, nil
	}
	// containerd finds the committed layer by its snapshot.ref label and
	// parent, so the label stays.
	commitLabels := maps.Clone(labels)
	commitLabels[labelRemote] = "true"
	commitLabels[labelRemoteSnapshot] = "remote snapshot"
	commitLabels[labelMountpoint] = dir
	// Commit first, mount after: the overlay snapshotter walks the directory
	// to account its usage, and walking an empty one is free, where walking
	// the FUSE view would stat every entry of the layer.
	if err := s.Snapshotter.Commit(ctx, target, key, snapshots.WithLabels(commitLabels)); err != nil {
		if rerr := s.Snapshotter.Remove(ctx, key); rerr != nil {
			return true, errors.Join(fmt.Errorf("commit %s: %w", target, err), rerr)
		}
		if errdefs.IsAlreadyExists(err) {
			// A concurrent Prepare of the same layer won.
			return true, exists
		}
		s.fallback(labels, fmt.Errorf("commit %s: %w", target, err))
		return false, nil
	}
	s.mu.Lock()
	closed := s.closed
	if !closed {
		// Known before it is mounted, so that Close unmounts it.
		s.remote[dir] = false
	}
	s.mu.Unlock()
	if closed {
		err = errors.New("snapshotter closed")
	} else {
		err = s.fs.Mount(ctx, dir, labels)
	}
	if err != nil {
		s.forget(dir)
		if rerr := s.Snapshotter.Remove(ctx, target); rerr != nil {
			return true, errors.Join(fmt.Errorf("mount %s: %w", layerDigest, err), fmt.Errorf("remove %s: %w", target, rerr))
		}
		s.fallback(labels, err)
		return false, nil
	}
	s.mu.Lock()
	closed = s.closed
	if !closed {
		s.remote[dir] = true
	}
	s.mu.Unlock()
	if closed {
		// Close ran while we mounted and did not see the mount.
		_ = s.fs.Unmount(context.WithoutCancel(ctx), dir)
		return true, errors.New("snapshotter closed")
	}
	s.log.Info("layer mounted lazily", "layer", layerDigest, "ref", labels[snapshotters.TargetRefLabel], "decision", "remote")
	metricRemote.Inc()
	return true, exists
}

// fallback says, in one log line and the metric, why a layer goes the
// ordinary way.
func (s *Snapshotter) fallback(labels map[string]string, err error) {
	reason := "error"
	if errors.Is(err, ErrNotRemote) {
		reason = "not-lazy"
	}
	metricFallback.WithLabelValues(reason).Inc()
	s.log.Warn("layer falls back to download and unpack", "layer", labels[snapshotters.TargetLayerDigestLabel],
		"ref", labels[snapshotters.TargetRefLabel], "decision", "fallback", "reason", err)
}

func (s *Snapshotter) forget(dir string) {
	s.mu.Lock()
	delete(s.remote, dir)
	s.mu.Unlock()
}

// fsDir is the directory of a fresh active snapshot that the layer is
// mounted on: a bind source without parents, the upperdir with them.
func fsDir(ms []mount.Mount) (string, error) {
	if len(ms) != 1 {
		return "", fmt.Errorf("unexpected mounts %v", ms)
	}
	if ms[0].Type == "bind" {
		return ms[0].Source, nil
	}
	for _, o := range ms[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			return v, nil
		}
	}
	return "", fmt.Errorf("no upper directory in %v", ms[0])
}

// View checks that the remote layers under parent serve before making a
// view on them.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	if err := s.checkChain(ctx, parent); err != nil {
		return nil, err
	}
	return s.Snapshotter.View(ctx, key, parent, opts...)
}

// Mounts checks that the remote layers under key serve before returning
// its mounts.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	info, err := s.Snapshotter.Stat(ctx, key)
	if err == nil {
		if err := s.checkChain(ctx, info.Parent); err != nil {
			return nil, err
		}
	}
	return s.Snapshotter.Mounts(ctx, key)
}

// checkChain checks every remote snapshot from key down, as the reference
// snapshotter does before handing out mounts: a layer whose FUSE mount is
// gone would show as an empty directory, silently.
func (s *Snapshotter) checkChain(ctx context.Context, key string) error {
	s.mu.Lock()
	none := len(s.remote) == 0
	s.mu.Unlock()
	if none {
		return nil
	}
	for key != "" {
		info, err := s.Snapshotter.Stat(ctx, key)
		if err != nil {
			// The inner call reports it.
			return nil
		}
		if info.Labels[labelMountpoint] != "" {
			if err := s.check(ctx, info); err != nil {
				return err
			}
		}
		key = info.Parent
	}
	return nil
}

// check checks a remote snapshot and, when it fails, logs it and mounts the
// layer again; it fails with ErrUnavailable when that fails too.
func (s *Snapshotter) check(ctx context.Context, info snapshots.Info) error {
	dir := info.Labels[labelMountpoint]
	err := s.fs.Check(ctx, dir, info.Labels)
	if err == nil {
		return nil
	}
	layerDigest := info.Labels[snapshotters.TargetLayerDigestLabel]
	s.log.Warn("remote snapshot failed its check; mounting it again", "snapshot", info.Name, "layer", layerDigest, "err", err)
	if err := s.remount(ctx, info); err != nil {
		s.log.Error("remote snapshot unavailable", "snapshot", info.Name, "layer", layerDigest, "err", err)
		return fmt.Errorf("remote snapshot %s (layer %s): %w: %v", info.Name, layerDigest, errdefs.ErrUnavailable, err)
	}
	return nil
}

// remount mounts a remote snapshot again, once however many callers ask.
func (s *Snapshotter) remount(ctx context.Context, info snapshots.Info) error {
	dir := info.Labels[labelMountpoint]
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("snapshotter closed")
	}
	if ch, ok := s.remounts[dir]; ok {
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
		return s.fs.Check(ctx, dir, info.Labels)
	}
	ch := make(chan struct{})
	s.remounts[dir] = ch
	s.remote[dir] = false
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.remounts, dir)
		s.mu.Unlock()
		close(ch)
	}()
	return s.mountAt(ctx, dir, info.Labels)
}

// mountAt mounts a known remote snapshot at dir, clearing what a dead
// mount left there first.
func (s *Snapshotter) mountAt(ctx context.Context, dir string, labels map[string]string) error {
	if err := s.fs.Unmount(ctx, dir); err != nil {
		s.log.Debug("unmount before mounting again", "mountpoint", dir, "err", err)
	}
	// A mount left by a daemon that died is dead: clear it. A directory
	// that is no mount point is fine.
	_ = mount.UnmountAll(dir, 0)
	if err := s.fs.Mount(ctx, dir, labels); err != nil {
		return err
	}
	s.mu.Lock()
	closed := s.closed
	if !closed {
		s.remote[dir] = true
	}
	s.mu.Unlock()
	if closed {
		_ = s.fs.Unmount(context.WithoutCancel(ctx), dir)
		return errors.New("snapshotter closed")
	}
	return nil
}

// Remove removes a snapshot, then unmounts it if it is remote: removal
// first, so that a removal containerd refuses (the snapshot has children)
// leaves the layer serving them.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	info, statErr := s.Snapshotter.Stat(ctx, key)
	if err := s.Snapshotter.Remove(ctx, key); err != nil {
		return err
	}
	if statErr != nil {
		return nil
	}
	dir := info.Labels[labelMountpoint]
	if dir == "" {
		return nil
	}
	s.forget(dir)
	if err := s.fs.Unmount(ctx, dir); err != nil {
		// The metadata is gone; the directory is cleaned up once the mount is.
		s.log.Error("unmount removed remote snapshot", "snapshot", key, "layer", info.Labels[snapshotters.TargetLayerDigestLabel], "err", err)
	}
	return nil
}

// Cleanup removes the directories of removed snapshots: with asynchronous
// removal, containerd's garbage collector calls it after Remove.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	if c, ok := s.Snapshotter.(snapshots.Cleaner); ok {
		return c.Cleanup(ctx)
	}
	return nil
}

// restore mounts again every remote snapshot found in the metadata.
func (s *Snapshotter) restore(ctx context.Context) error {
	type todo struct {
		name   string
		dir    string
		labels map[string]string
	}
	var list []todo
	err := s.Snapshotter.Walk(ctx, func(ctx context.Context, i snapshots.Info) error {
		if dir := i.Labels[labelMountpoint]; dir != "" && i.Labels[labelRemote] != "" {
			list = append(list, todo{i.Name, dir, i.Labels})
		}
		return nil
	})
	if err != nil && !errdefs.IsNotFound(err) {
		// A fresh store has no bucket yet: nothing to restore.
		return fmt.Errorf("list snapshots: %w", err)
	}
	s.mu.Lock()
	for _, t := range list {
		s.remote[t.dir] = false
	}
	s.mu.Unlock()
	var g errgroup.Group
	g.SetLimit(restoreParallel)
	for _, t := range list {
		g.Go(func() error {
			layerDigest := t.labels[snapshotters.TargetLayerDigestLabel]
			if err := s.mountAt(ctx, t.dir, t.labels); err != nil {
				// The snapshot stays: Check mounts it again when it is used,
				// and containers can be re-created then.
				s.log.Error("remount remote snapshot", "snapshot", t.name, "layer", layerDigest, "err", err)
				return nil
			}
			s.log.Info("remote snapshot mounted again", "snapshot", t.name, "layer", layerDigest)
			return nil
		})
	}
	return g.Wait()
}

// Close unmounts every remote layer and closes the overlay snapshotter.
// The FileSystem stays open: its owner closes it.
func (s *Snapshotter) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		dirs := s.remote
		s.remote = map[string]bool{}
		s.mu.Unlock()
		var errs []error
		for dir := range dirs {
			if err := s.fs.Unmount(context.Background(), dir); err != nil {
				errs = append(errs, err)
			}
		}
		errs = append(errs, s.Snapshotter.Close())
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}
