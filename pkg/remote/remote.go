// Package remote is the snapshot.FileSystem of starling's lazy layers: it
// reads what containerd's labels say of a layer, finds the layer's
// descriptor (in its manifest, fetched once for all its layers), resolves
// the layer and mounts it. As soon as one layer of an image is prepared it
// resolves the image's other layers too, since containerd prepares them one
// after another and each resolution costs a round trip; a layer resolved
// ahead that no mount takes is closed when the image's last layer is
// mounted, after a while, or on Close.
package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	ggcr "github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/moby/sys/mountinfo"

	"github.com/starling-dev/starling/pkg/layer"
	"github.com/starling-dev/starling/pkg/snapshot"
)

// TOCDigestLabel carries the layer's TOC digest: the layer annotation that
// containerd passes as a snapshot label.
const TOCDigestLabel = "containerd.io/snapshot/stargz/toc.digest"

// Registry is what the file system asks of the registry (pkg/registry's
// Client is one).
type Registry interface {
	ParseReference(s string) (name.Reference, error)
	// Get fetches a manifest.
	Get(ctx context.Context, ref name.Reference, opts ...ggcr.Option) (*ggcr.Descriptor, error)
	BlobSize(ctx context.Context, repo name.Repository, h v1.Hash) (int64, error)
}

// Layer is a resolved layer (pkg/layer's *Layer is one).
type Layer interface {
	// Mount mounts the layer read-only at dir.
	Mount(dir string) error
	// Unmount unmounts the layer and ends all its work.
	Unmount() error
	// Close ends the work of a layer that was never mounted.
	Close()
}

// Resolver resolves layers (pkg/layer's *Manager is one).
type Resolver[L Layer] interface {
	Resolve(ctx context.Context, repo name.Repository, desc v1.Descriptor) (L, error)
}

var _ Resolver[*layer.Layer] = (*layer.Manager)(nil)

// Options configures an FS.
type Options struct {
	Logger *slog.Logger
	// PendingTTL is how long a layer resolved ahead waits for its mount
	// before it is closed (default 2 minutes). Manifests are kept as long.
	PendingTTL time.Duration
}

// DefaultPendingTTL is PendingTTL's default: long enough for containerd to
// download and unpack the ordinary layers between two lazy ones.
const DefaultPendingTTL = 2 * time.Minute

// FS implements snapshot.FileSystem and snapshot.Resolver.
type FS struct {
	reg     Registry
	resolve func(ctx context.Context, repo name.Repository, desc v1.Descriptor) (Layer, error)
	log     *slog.Logger
	ttl     time.Duration
	// checkMount says whether dir is a FUSE mount; tests replace it.
	checkMount func(dir string) error

	// ctx ends resolutions and the sweeper on Close.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	closed    bool
	mounted   map[string]Layer         // mountpoint -> layer
	pending   map[string]*pending      // repo@layer digest -> resolution not yet mounted
	manifests map[string]*manifestCall // repo@digest -> manifest
}

type pending struct {
	done  chan struct{}
	l     Layer
	err   error
	group string // the image whose prepare started it
	// wanted: a prepare of this very layer waits for it, so the end of
	// its image's prepare does not close it.
	wanted  bool
	expires time.Time // set once done
}

type manifestCall struct {
	done    chan struct{}
	m       *v1.Manifest
	err     error
	expires time.Time
}

// New makes an FS; Close ends it.
func New[L Layer](reg Registry, res Resolver[L], o Options) *FS {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.PendingTTL <= 0 {
		o.PendingTTL = DefaultPendingTTL
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &FS{
		reg: reg,
		resolve: func(ctx context.Context, repo name.Repository, desc v1.Descriptor) (Layer, error) {
			l, err := res.Resolve(ctx, repo, desc)
			if err != nil {
				return nil, err
			}
			return l, nil
		},
		log:        o.Logger,
		ttl:        o.PendingTTL,
		checkMount: isFUSEMount,
		ctx:        ctx,
		cancel:     cancel,
		mounted:    map[string]Layer{},
		pending:    map[string]*pending{},
		manifests:  map[string]*manifestCall{},
	}
	f.wg.Add(1)
	go f.sweeper()
	return f
}

// key names a layer in the pending set: by repository too, since the
// layer's fetcher reads from it.
func key(repo name.Repository, h string) string { return repo.String() + "@" + h }

// target is what the labels of a Prepare say of its layer.
type target struct {
	ref      name.Reference
	layer    v1.Hash
	manifest string // digest, or "" when the labels do not name it
	toc      string
	image    []string // the image's layers from this one up, when named
}

// parseLabels reads the CRI labels (which `starling pull` sets too).
func (f *FS) parseLabels(labels map[string]string) (target, error) {
	refStr, ld, toc := labels[snapshotters.TargetRefLabel], labels[snapshotters.TargetLayerDigestLabel], labels[TOCDigestLabel]
	if refStr == "" || ld == "" || toc == "" {
		return target{}, fmt.Errorf("layer %q: %w: no lazy-pull labels (image not eStargz, or containerd not passing snapshot annotations)", ld, snapshot.ErrNotRemote)
	}
	h, err := v1.NewHash(ld)
	if err != nil {
		return target{}, fmt.Errorf("layer digest %q: %w", ld, err)
	}
	ref, err := f.reg.ParseReference(refStr)
	if err != nil {
		return target{}, fmt.Errorf("layer %s: image reference %q: %w", ld, refStr, err)
	}
	t := target{ref: ref, layer: h, manifest: labels[snapshotters.TargetManifestDigestLabel], toc: toc}
	if s := labels[snapshotters.TargetImageLayersLabel]; s != "" {
		t.image = strings.Split(s, ",")
	}
	return t, nil
}

// group names the image a prepare belongs to.
func (t target) group() string {
	if t.manifest != "" {
		return t.ref.Context().String() + "@" + t.manifest
	}
	return t.ref.String()
}

// last reports whether t is the image's top layer as far as the labels go:
// once it is prepared, the image's other layers have been.
func (t target) last() bool {
	return len(t.image) > 0 && t.image[len(t.image)-1] == t.layer.String()
}

func (t target) key() string { return key(t.ref.Context(), t.layer.String()) }

// Resolve resolves the layer the labels name, and starts resolving the
// image's other layers, for the Mount that follows.
func (f *FS) Resolve(ctx context.Context, labels map[string]string) error {
	t, err := f.parseLabels(labels)
	if err != nil {
		return err
	}
	f.resolveSiblings(t)
	p, err := f.pendingFor(t)
	if err != nil {
		return err
	}
	select {
	case <-p.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if p.err != nil {
		f.take(t.key(), p)
		if t.last() {
			f.endGroup(t.group())
		}
		return p.err
	}
	return nil
}

// Mount mounts the layer the labels name at mountpoint, with the
// resolution Resolve made when there is one.
func (f *FS) Mount(ctx context.Context, mountpoint string, labels map[string]string) error {
	mountpoint = filepath.Clean(mountpoint)
	t, err := f.parseLabels(labels)
	if err != nil {
		return err
	}
	f.mu.Lock()
	_, busy := f.mounted[mountpoint]
	f.mu.Unlock()
	if busy {
		return fmt.Errorf("layer %s: %s is already mounted", t.layer, mountpoint)
	}
	l, err := f.get(ctx, t)
	if t.last() {
		f.endGroup(t.group())
	}
	if err != nil {
		return err
	}
	if err := l.Mount(mountpoint); err != nil {
		l.Close()
		return nameLayer(t.layer, fmt.Errorf("mount at %s: %w", mountpoint, err))
	}
	f.mu.Lock()
	closed := f.closed
	_, busy = f.mounted[mountpoint]
	if !closed && !busy {
		f.mounted[mountpoint] = l
	}
	f.mu.Unlock()
	if closed || busy {
		err := l.Unmount()
		return nameLayer(t.layer, errors.Join(fmt.Errorf("mount at %s: closed or mounted concurrently", mountpoint), err))
	}
	return nil
}

// get takes the layer's resolution, waiting for it, or resolves it.
func (f *FS) get(ctx context.Context, t target) (Layer, error) {
	// A resolution that a concurrent mount of the same layer took, or that
	// expired as we waited, is started again: each round one mount wins.
	for {
		p, err := f.pendingFor(t)
		if err != nil {
			return nil, err
		}
		select {
		case <-p.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if f.take(t.key(), p) {
			return p.l, p.err
		}
	}
}

// pendingFor returns the resolution of t's layer, starting it if needed.
func (f *FS) pendingFor(t target) (*pending, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, nameLayer(t.layer, errors.New("file system closed"))
	}
	if p, ok := f.pending[t.key()]; ok {
		p.wanted = true
		return p, nil
	}
	p := &pending{done: make(chan struct{}), group: t.group(), wanted: true}
	f.pending[t.key()] = p
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		f.run(p, t.layer.String(), func(ctx context.Context) (Layer, error) {
			desc, err := f.descriptor(ctx, t)
			if err != nil {
				return nil, err
			}
			return f.resolveDesc(ctx, t.ref.Context(), desc)
		})
	}()
	return p, nil
}

// run fills p and marks it done. A panic of the resolution (a hostile
// layer) fails that layer alone.
func (f *FS) run(p *pending, layer string, fn func(context.Context) (Layer, error)) {
	var (
		l   Layer
		err error
	)
	func() {
		defer func() {
			if r := recover(); r != nil {
				l, err = nil, fmt.Errorf("layer %s: panic while resolving: %v", layer, r)
				f.log.Error("panic while resolving a layer", "layer", layer, "panic", r, "stack", string(debug.Stack()))
			}
		}()
		l, err = fn(f.ctx)
	}()
	f.mu.Lock()
	p.l, p.err = l, err
	p.expires = time.Now().Add(f.ttl)
	f.mu.Unlock()
	close(p.done)
}

// take removes p from the pending set; false: it was taken already.
func (f *FS) take(k string, p *pending) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pending[k] != p {
		return false
	}
	delete(f.pending, k)
	return true
}

func (f *FS) resolveDesc(ctx context.Context, repo name.Repository, desc v1.Descriptor) (Layer, error) {
	l, err := f.resolve(ctx, repo, desc)
	if err != nil {
		if errors.Is(err, layer.ErrNotLazy) {
			err = fmt.Errorf("%w: %w", snapshot.ErrNotRemote, err)
		}
		return nil, nameLayer(desc.Digest, err)
	}
	return l, nil
}

// resolveSiblings starts resolving the image's other layers that the labels
// list, found in its manifest.
func (f *FS) resolveSiblings(t target) {
	if t.manifest == "" || len(t.image) < 2 {
		return
	}
	group := t.group()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return
	}
	for _, dg := range t.image {
		if dg == t.layer.String() {
			continue
		}
		k := key(t.ref.Context(), dg)
		if _, ok := f.pending[k]; ok {
			continue
		}
		p := &pending{done: make(chan struct{}), group: group}
		f.pending[k] = p
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			f.run(p, dg, func(ctx context.Context) (Layer, error) {
				h, err := v1.NewHash(dg)
				if err != nil {
					return nil, fmt.Errorf("layer digest %q: %w", dg, err)
				}
				desc, err := f.fromManifest(ctx, t.ref, t.manifest, h)
				if err != nil {
					return nil, err
				}
				if desc.Annotations[TOCDigestLabel] == "" {
					return nil, nameLayer(h, fmt.Errorf("%w: no TOC digest in its manifest", snapshot.ErrNotRemote))
				}
				return f.resolveDesc(ctx, t.ref.Context(), desc)
			})
		}()
	}
}

// endGroup closes what was resolved ahead for an image whose prepare is
// over and that no prepare asked for.
func (f *FS) endGroup(group string) {
	f.mu.Lock()
	var stale []*pending
	for k, p := range f.pending {
		if p.group == group && !p.wanted {
			delete(f.pending, k)
			stale = append(stale, p)
		}
	}
	f.mu.Unlock()
	f.closeAll(stale)
}

// closeAll closes resolutions nobody takes, waiting for those still running
// in the background so the caller does not.
func (f *FS) closeAll(ps []*pending) {
	for _, p := range ps {
		select {
		case <-p.done:
			if p.l != nil {
				p.l.Close()
			}
		default:
			f.mu.Lock()
			closed := f.closed
			if !closed {
				f.wg.Add(1)
			}
			f.mu.Unlock()
			if closed {
				// Close waits for it through the pending set's goroutines.
				<-p.done
				if p.l != nil {
					p.l.Close()
				}
				continue
			}
			go func() {
				defer f.wg.Done()
				<-p.done
				if p.l != nil {
					p.l.Close()
				}
			}()
		}
	}
}

// descriptor finds the layer's descriptor: in its manifest when the labels
// name it, else from the labels and a HEAD request.
func (f *FS) descriptor(ctx context.Context, t target) (v1.Descriptor, error) {
	if t.manifest != "" {
		d, err := f.fromManifest(ctx, t.ref, t.manifest, t.layer)
		if err != nil {
			return v1.Descriptor{}, err
		}
		// The snapshot label is what containerd vouches for.
		d.Annotations[TOCDigestLabel] = t.toc
		return d, nil
	}
	size, err := f.reg.BlobSize(ctx, t.ref.Context(), t.layer)
	if err != nil {
		return v1.Descriptor{}, nameLayer(t.layer, fmt.Errorf("size: %w", err))
	}
	return v1.Descriptor{Digest: t.layer, Size: size, MediaType: "application/vnd.oci.image.layer.v1.tar+gzip",
		Annotations: map[string]string{TOCDigestLabel: t.toc}}, nil
}

// fromManifest returns a copy of the layer's descriptor in manifest md.
func (f *FS) fromManifest(ctx context.Context, ref name.Reference, md string, h v1.Hash) (v1.Descriptor, error) {
	m, err := f.manifest(ctx, ref.Context(), md)
	if err != nil {
		return v1.Descriptor{}, nameLayer(h, fmt.Errorf("manifest %s: %w", md, err))
	}
	for _, d := range m.Layers {
		if d.Digest == h {
			ann := make(map[string]string, len(d.Annotations)+1)
			for k, v := range d.Annotations {
				ann[k] = v
			}
			d.Annotations = ann
			return d, nil
		}
	}
	return v1.Descriptor{}, nameLayer(h, fmt.Errorf("not in manifest %s", md))
}

// manifest fetches manifest md of repo once, however many layers ask.
func (f *FS) manifest(ctx context.Context, repo name.Repository, md string) (*v1.Manifest, error) {
	key := repo.String() + "@" + md
	f.mu.Lock()
	c, ok := f.manifests[key]
	if !ok {
		c = &manifestCall{done: make(chan struct{})}
		f.manifests[key] = c
		f.mu.Unlock()
		c.m, c.err = f.fetchManifest(ctx, repo, md)
		f.mu.Lock()
		c.expires = time.Now().Add(f.ttl)
		if c.err != nil {
			// Not kept: the next layer tries again.
			delete(f.manifests, key)
		}
		f.mu.Unlock()
		close(c.done)
		return c.m, c.err
	}
	f.mu.Unlock()
	select {
	case <-c.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return c.m, c.err
}

func (f *FS) fetchManifest(ctx context.Context, repo name.Repository, md string) (*v1.Manifest, error) {
	d, err := f.reg.Get(ctx, repo.Digest(md))
	if err != nil {
		return nil, err
	}
	return v1.ParseManifest(bytes.NewReader(d.Manifest))
}

// Check reports whether the layer at mountpoint is mounted and served.
func (f *FS) Check(ctx context.Context, mountpoint string, labels map[string]string) error {
	mountpoint = filepath.Clean(mountpoint)
	f.mu.Lock()
	_, ok := f.mounted[mountpoint]
	f.mu.Unlock()
	if !ok {
		return fmt.Errorf("layer %s: nothing mounted at %s", labels[snapshotters.TargetLayerDigestLabel], mountpoint)
	}
	if err := f.checkMount(mountpoint); err != nil {
		return fmt.Errorf("layer %s: %w", labels[snapshotters.TargetLayerDigestLabel], err)
	}
	return nil
}

// isFUSEMount reads the mount table rather than asking the mount itself,
// so a check cannot hang on a stuck FUSE request.
func isFUSEMount(dir string) error {
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(dir))
	if err != nil {
		return fmt.Errorf("mount table: %w", err)
	}
	if len(ms) == 0 {
		return fmt.Errorf("%s is not mounted", dir)
	}
	if t := ms[len(ms)-1].FSType; !strings.HasPrefix(t, "fuse") {
		return fmt.Errorf("%s is a %s mount, not FUSE", dir, t)
	}
	return nil
}

// Unmount unmounts the layer at mountpoint, which ends it.
func (f *FS) Unmount(ctx context.Context, mountpoint string) error {
	mountpoint = filepath.Clean(mountpoint)
	f.mu.Lock()
	l, ok := f.mounted[mountpoint]
	delete(f.mounted, mountpoint)
	f.mu.Unlock()
	if !ok {
		return nil
	}
	if err := l.Unmount(); err != nil {
		return fmt.Errorf("unmount %s: %w", mountpoint, err)
	}
	return nil
}

// sweeper closes resolutions made ahead that no mount took in time, and
// forgets old manifests.
func (f *FS) sweeper() {
	defer f.wg.Done()
	t := time.NewTicker(max(f.ttl/4, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-f.ctx.Done():
			return
		case now := <-t.C:
			f.sweep(now)
		}
	}
}

func (f *FS) sweep(now time.Time) {
	var stale []*pending
	f.mu.Lock()
	for k, p := range f.pending {
		select {
		case <-p.done:
			if now.After(p.expires) {
				delete(f.pending, k)
				stale = append(stale, p)
			}
		default:
		}
	}
	for k, c := range f.manifests {
		select {
		case <-c.done:
			if now.After(c.expires) {
				delete(f.manifests, k)
			}
		default:
		}
	}
	f.mu.Unlock()
	for _, p := range stale {
		if p.l != nil {
			f.log.Debug("layer resolved ahead but never mounted; closing it")
			p.l.Close()
		}
	}
}

// Close unmounts what is still mounted, closes what was resolved ahead and
// waits for all background work to end.
func (f *FS) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	mounted, pend := f.mounted, f.pending
	f.mounted, f.pending = map[string]Layer{}, map[string]*pending{}
	f.mu.Unlock()
	f.cancel()
	var errs []error
	for dir, l := range mounted {
		if err := l.Unmount(); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", dir, err))
		}
	}
	for _, p := range pend {
		<-p.done
		if p.l != nil {
			p.l.Close()
		}
	}
	f.wg.Wait()
	return errors.Join(errs...)
}

// nameLayer makes sure err names the layer.
func nameLayer(h v1.Hash, err error) error {
	if strings.Contains(err.Error(), h.String()) {
		return err
	}
	return fmt.Errorf("layer %s: %w", h, err)
}
