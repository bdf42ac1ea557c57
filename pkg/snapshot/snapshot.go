// Package snapshot is starling's containerd snapshotter: containerd's own
// overlay snapshotter for ordinary layers, plus remote snapshots — layers
// mounted lazily through FUSE and reported to containerd as already present,
// so that it skips download and unpack.
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
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/starling-dev/starling/pkg/layer"
	"github.com/starling-dev/starling/pkg/registry"
)

// Labels starling keeps on a committed remote snapshot, to mount it again
// after a restart.
const (
	labelTargetSnapshot = "containerd.io/snapshot.ref"
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

// remoteInfo is what is needed to mount a remote snapshot again.
type remoteInfo struct {
	Ref        string        `json:"ref"`
	Descriptor v1.Descriptor `json:"descriptor"`
}

// Snapshotter implements snapshots.Snapshotter.
type Snapshotter struct {
	snapshots.Snapshotter // containerd's overlay snapshotter
	client                *registry.Client
	layers                *layer.Manager
	log                   *slog.Logger

	mu      sync.Mutex
	mounted map[string]*layer.Layer // mountpoint -> layer
	manif   map[string]*manifestCall
	resolve map[string]*resolveCall // layer digest -> resolution
}

type manifestCall struct {
	done chan struct{}
	m    *v1.Manifest
	err  error
}

type resolveCall struct {
	done chan struct{}
	l    *layer.Layer
	err  error
}

// New opens the snapshotter under root and mounts again the remote
// snapshots it had.
func New(ctx context.Context, root string, client *registry.Client, layers *layer.Manager, log *slog.Logger) (*Snapshotter, error) {
	inner, err := overlay.NewSnapshotter(root, overlay.AsynchronousRemove)
	if err != nil {
		return nil, fmt.Errorf("overlay snapshotter at %s: %w", root, err)
	}
	if log == nil {
		log = slog.Default()
	}
	s := &Snapshotter{
		Snapshotter: inner,
		client:      client,
		layers:      layers,
		log:         log,
		mounted:     map[string]*layer.Layer{},
		manif:       map[string]*manifestCall{},
		resolve:     map[string]*resolveCall{},
	}
	if err := s.restore(ctx); err != nil {
		inner.Close()
		return nil, err
	}
	return s, nil
}

// lazyTarget returns what identifies a lazily mountable layer in Prepare's
// labels: the CRI labels, which `starling pull` sets too.
func lazyTarget(labels map[string]string) (ref, layerDigest string, ok bool) {
	ref, layerDigest = labels[snapshotters.TargetRefLabel], labels[snapshotters.TargetLayerDigestLabel]
	return ref, layerDigest, ref != "" && layerDigest != "" && labels[layer.TOCDigestAnnotation] != ""
}

// Prepare creates an active snapshot; for a lazily mountable layer it
// mounts the layer, commits it as the target and says it already exists.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	target, hasTarget := base.Labels[labelTargetSnapshot]
	ref, ld, lazy := lazyTarget(base.Labels)
	s.log.Debug("prepare", "key", key, "parent", parent, "layer", ld)
	if hasTarget && lazy {
		if s.committed(ctx, target, parent) {
			return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
		}
		s.prefetchSiblings(ctx, ref, base.Labels)
		err := s.prepareRemote(ctx, key, parent, target, ref, ld, base.Labels, opts)
		if err == nil {
			s.log.Info("layer mounted lazily", "layer", ld, "ref", ref, "decision", "remote")
			metricRemote.Inc()
			return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
		}
		reason := "error"
		if errors.Is(err, layer.ErrNotLazy) {
			reason = "not-lazy"
		}
		metricFallback.WithLabelValues(reason).Inc()
		s.log.Warn("layer falls back to download and unpack", "layer", ld, "ref", ref, "decision", "fallback", "reason", err)
	} else if hasTarget {
		metricFallback.WithLabelValues("not-lazy").Inc()
		s.log.Warn("layer falls back to download and unpack", "layer", base.Labels[snapshotters.TargetLayerDigestLabel], "decision", "fallback",
			"reason", "no lazy-pull labels (image not eStargz, or containerd not passing snapshot annotations)")
	}
	return s.Snapshotter.Prepare(ctx, key, parent, opts...)
}

// committed reports whether a committed snapshot for target on parent exists.
func (s *Snapshotter) committed(ctx context.Context, target, parent string) bool {
	found := false
	filter := fmt.Sprintf(`labels."%s"==%s,parent==%q`, labelTargetSnapshot, target, parent)
	_ = s.Snapshotter.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		if i.Kind == snapshots.KindCommitted && i.Labels[labelTargetSnapshot] == target && i.Parent == parent {
			found = true
		}
		return nil
	}, filter)
	return found
}

func (s *Snapshotter) prepareRemote(ctx context.Context, key, parent, target, ref, layerDigest string, labels map[string]string, opts []snapshots.Opt) error {
	l, info, err := s.resolveLayer(ctx, ref, layerDigest, labels)
	if err != nil {
		return err
	}
	mounts, err := s.Snapshotter.Prepare(ctx, key, parent, opts...)
	if err != nil {
		return fmt.Errorf("prepare %s: %w", key, err)
	}
	dir, err := fsDir(mounts)
	if err != nil {
		_ = s.Snapshotter.Remove(ctx, key)
		return err
	}
	infoJSON, _ := json.Marshal(info)
	// containerd finds the committed layer by its snapshot.ref label and
	// parent, so the label stays.
	commitLabels := map[string]string{}
	for k, v := range labels {
		commitLabels[k] = v
	}
	commitLabels[labelRemote] = string(infoJSON)
	commitLabels[labelMountpoint] = dir
	// Commit first, mount after: the overlay snapshotter walks the directory
	// to account its usage, and walking an empty one is free, where walking
	// the FUSE view would stat every entry of the layer.
	if err := s.Snapshotter.Commit(ctx, target, key, snapshots.WithLabels(commitLabels)); err != nil {
		_ = s.Snapshotter.Remove(ctx, key)
		return fmt.Errorf("commit %s: %w", target, err)
	}
	if err := l.Mount(dir); err != nil {
		_ = s.Snapshotter.Remove(ctx, target)
		return err
	}
	s.mu.Lock()
	s.mounted[dir] = l
	s.mu.Unlock()
	return nil
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

// manifest fetches (once) the manifest a layer belongs to, for the layer's
// size, media type and annotations.
func (s *Snapshotter) manifest(ctx context.Context, ref name.Reference, dg string) (*v1.Manifest, error) {
	key := ref.Context().String() + "@" + dg
	s.mu.Lock()
	c, ok := s.manif[key]
	if !ok {
		c = &manifestCall{done: make(chan struct{})}
		s.manif[key] = c
		s.mu.Unlock()
		func() {
			defer close(c.done)
			d, err := s.client.Get(ctx, ref.Context().Digest(dg))
			if err != nil {
				c.err = err
				return
			}
			c.m, c.err = v1.ParseManifest(strings.NewReader(string(d.Manifest)))
		}()
		if c.err != nil {
			s.mu.Lock()
			delete(s.manif, key)
			s.mu.Unlock()
		}
	} else {
		s.mu.Unlock()
		<-c.done
	}
	return c.m, c.err
}

// descriptor finds the layer's descriptor: from its manifest when the labels
// name it, else from the labels and a HEAD request.
func (s *Snapshotter) descriptor(ctx context.Context, ref name.Reference, layerDigest string, labels map[string]string) (v1.Descriptor, error) {
	h, err := v1.NewHash(layerDigest)
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("layer digest %q: %w", layerDigest, err)
	}
	if md := labels[snapshotters.TargetManifestDigestLabel]; md != "" {
		m, err := s.manifest(ctx, ref, md)
		if err != nil {
			return v1.Descriptor{}, fmt.Errorf("manifest of layer %s: %w", layerDigest, err)
		}
		for _, d := range m.Layers {
			if d.Digest == h {
				// The snapshot label is what containerd vouches for.
				if t := labels[layer.TOCDigestAnnotation]; t != "" {
					if d.Annotations == nil {
						d.Annotations = map[string]string{}
					}
					d.Annotations[layer.TOCDigestAnnotation] = t
				}
				return d, nil
			}
		}
		return v1.Descriptor{}, fmt.Errorf("layer %s is not in manifest %s", layerDigest, md)
	}
	size, err := s.client.BlobSize(ctx, ref.Context(), h)
	if err != nil {
		return v1.Descriptor{}, err
	}
	return v1.Descriptor{Digest: h, Size: size, MediaType: "application/vnd.oci.image.layer.v1.tar+gzip",
		Annotations: map[string]string{layer.TOCDigestAnnotation: labels[layer.TOCDigestAnnotation]}}, nil
}

// resolveLayer resolves a layer once, however many Prepares ask for it.
func (s *Snapshotter) resolveLayer(ctx context.Context, refStr, layerDigest string, labels map[string]string) (*layer.Layer, remoteInfo, error) {
	ref, err := s.client.ParseReference(refStr)
	if err != nil {
		return nil, remoteInfo{}, err
	}
	desc, err := s.descriptor(ctx, ref, layerDigest, labels)
	if err != nil {
		return nil, remoteInfo{}, err
	}
	s.log.Debug("layer descriptor", "layer", layerDigest)
	info := remoteInfo{Ref: refStr, Descriptor: desc}
	s.mu.Lock()
	c, ok := s.resolve[layerDigest]
	if ok {
		// A resolution is consumed by the one mount it is for.
		delete(s.resolve, layerDigest)
		s.mu.Unlock()
		<-c.done
		if c.err == nil {
			return c.l, info, nil
		}
	} else {
		s.mu.Unlock()
	}
	l, err := s.layers.Resolve(context.WithoutCancel(ctx), ref.Context(), desc)
	return l, info, err
}

// prefetchSiblings resolves the other layers of the image in parallel, as
// soon as the first of them is prepared: containerd prepares layers one
// after another, and each resolution costs a round trip.
func (s *Snapshotter) prefetchSiblings(ctx context.Context, refStr string, labels map[string]string) {
	layers := labels[snapshotters.TargetImageLayersLabel]
	if layers == "" {
		return
	}
	ref, err := s.client.ParseReference(refStr)
	if err != nil {
		return
	}
	for _, dg := range strings.Split(layers, ",") {
		if dg == labels[snapshotters.TargetLayerDigestLabel] {
			continue
		}
		s.mu.Lock()
		if _, ok := s.resolve[dg]; ok {
			s.mu.Unlock()
			continue
		}
		c := &resolveCall{done: make(chan struct{})}
		s.resolve[dg] = c
		s.mu.Unlock()
		go func() {
			defer close(c.done)
			ctx := context.WithoutCancel(ctx)
			desc, err := s.descriptor(ctx, ref, dg, map[string]string{snapshotters.TargetManifestDigestLabel: labels[snapshotters.TargetManifestDigestLabel]})
			if err == nil && !layer.IsLazy(desc) {
				err = layer.ErrNotLazy
			}
			if err == nil {
				c.l, c.err = s.layers.Resolve(ctx, ref.Context(), desc)
			} else {
				c.err = err
			}
		}()
	}
}

// Remove unmounts a remote snapshot before removing it.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	if info, err := s.Stat(ctx, key); err == nil {
		if dir := info.Labels[labelMountpoint]; dir != "" {
			s.mu.Lock()
			l := s.mounted[dir]
			delete(s.mounted, dir)
			s.mu.Unlock()
			if l != nil {
				if err := l.Unmount(); err != nil {
					return fmt.Errorf("remove %s: %w", key, err)
				}
			}
		}
	}
	return s.Snapshotter.Remove(ctx, key)
}

// restore mounts again every remote snapshot found in the metadata.
func (s *Snapshotter) restore(ctx context.Context) error {
	type todo struct {
		name string
		dir  string
		info remoteInfo
	}
	var list []todo
	err := s.Snapshotter.Walk(ctx, func(ctx context.Context, i snapshots.Info) error {
		raw, dir := i.Labels[labelRemote], i.Labels[labelMountpoint]
		if raw == "" || dir == "" {
			return nil
		}
		var info remoteInfo
		if err := json.Unmarshal([]byte(raw), &info); err != nil {
			s.log.Error("remote snapshot with unreadable label", "snapshot", i.Name, "err", err)
			return nil
		}
		list = append(list, todo{i.Name, dir, info})
		return nil
	})
	if err != nil && !errdefs.IsNotFound(err) {
		// A fresh store has no bucket yet: nothing to restore.
		return fmt.Errorf("list snapshots: %w", err)
	}
	for _, t := range list {
		// A mount left by a daemon that died is dead; clear it first.
		_ = mount.UnmountAll(t.dir, 0)
		ref, err := s.client.ParseReference(t.info.Ref)
		var l *layer.Layer
		if err == nil {
			l, err = s.layers.Resolve(ctx, ref.Context(), t.info.Descriptor)
		}
		if err == nil {
			err = l.Mount(t.dir)
		}
		if err != nil {
			// The snapshot stays; reads will fail until the registry is back
			// and the daemon restarted. Containers can be re-created then.
			s.log.Error("remount remote snapshot", "snapshot", t.name, "layer", t.info.Descriptor.Digest, "err", err)
			continue
		}
		s.mu.Lock()
		s.mounted[t.dir] = l
		s.mu.Unlock()
		s.log.Info("remote snapshot mounted again", "snapshot", t.name, "layer", t.info.Descriptor.Digest)
	}
	return nil
}

// Close unmounts every remote layer and closes the overlay snapshotter.
func (s *Snapshotter) Close() error {
	s.mu.Lock()
	mounted := s.mounted
	s.mounted = map[string]*layer.Layer{}
	s.mu.Unlock()
	var errs []error
	for _, l := range mounted {
		if err := l.Unmount(); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, s.Snapshotter.Close())
	return errors.Join(errs...)
}
