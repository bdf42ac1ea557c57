// Package imageref names where an image lives — a registry reference or an
// OCI layout directory (oci:DIR[:TAG]) — and reads and writes images there.
package imageref

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/match"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/starling-dev/starling/pkg/registry"
)

// refNameAnnotation tags a manifest in an OCI layout's index.json.
const refNameAnnotation = "org.opencontainers.image.ref.name"

// Ref is an image location: a registry reference, or an OCI layout with a tag.
type Ref struct {
	raw    string
	Remote name.Reference // set for registry references
	Dir    string         // set for oci: layouts
	Tag    string         // the layout's tag; empty picks the only image
}

// Parse reads "oci:DIR[:TAG]" or a registry reference.
func Parse(s string, c *registry.Client) (Ref, error) {
	if rest, ok := strings.CutPrefix(s, "oci:"); ok {
		dir, tag := rest, ""
		if i := strings.LastIndexByte(rest, ':'); i > 0 && !strings.Contains(rest[i+1:], "/") {
			dir, tag = rest[:i], rest[i+1:]
		}
		if dir == "" {
			return Ref{}, fmt.Errorf("%q: oci: needs a directory", s)
		}
		return Ref{raw: s, Dir: dir, Tag: tag}, nil
	}
	r, err := c.ParseReference(s)
	if err != nil {
		return Ref{}, err
	}
	return Ref{raw: s, Remote: r}, nil
}

func (r Ref) String() string { return r.raw }

// IsLayout reports whether r is an OCI layout.
func (r Ref) IsLayout() bool { return r.Dir != "" }

// Source is what a reference resolved to: an index or an image.
type Source struct {
	Ref        Ref
	Descriptor v1.Descriptor
	Index      v1.ImageIndex // set when the reference names an index
	Image      v1.Image      // set when it names an image
}

// Load resolves r without reading any layer.
func Load(ctx context.Context, c *registry.Client, r Ref) (*Source, error) {
	if r.IsLayout() {
		return loadLayout(r)
	}
	d, err := c.Get(ctx, r.Remote)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", r, err)
	}
	s := &Source{Ref: r, Descriptor: d.Descriptor}
	switch d.MediaType {
	case types.OCIImageIndex, types.DockerManifestList:
		s.Index, err = d.ImageIndex()
	case types.OCIManifestSchema1, types.DockerManifestSchema2, types.DockerManifestSchema1, types.DockerManifestSchema1Signed:
		s.Image, err = d.Image()
	default:
		return nil, fmt.Errorf("resolve %s: unsupported manifest media type %q", r, d.MediaType)
	}
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", r, err)
	}
	return s, nil
}

func loadLayout(r Ref) (*Source, error) {
	p, err := layout.FromPath(r.Dir)
	if err != nil {
		return nil, fmt.Errorf("open OCI layout %s: %w", r.Dir, err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		return nil, fmt.Errorf("open OCI layout %s: %w", r.Dir, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("open OCI layout %s: %w", r.Dir, err)
	}
	var picked []v1.Descriptor
	for _, d := range im.Manifests {
		if r.Tag == "" || d.Annotations[refNameAnnotation] == r.Tag {
			picked = append(picked, d)
		}
	}
	switch {
	case len(picked) == 0:
		return nil, fmt.Errorf("OCI layout %s: no image tagged %q", r.Dir, r.Tag)
	case len(picked) > 1:
		return nil, fmt.Errorf("OCI layout %s holds %d images: name one with oci:%s:TAG", r.Dir, len(picked), r.Dir)
	}
	d := picked[0]
	s := &Source{Ref: r, Descriptor: d}
	switch d.MediaType {
	case types.OCIImageIndex, types.DockerManifestList:
		s.Index, err = idx.ImageIndex(d.Digest)
	default:
		s.Image, err = idx.Image(d.Digest)
	}
	if err != nil {
		return nil, fmt.Errorf("OCI layout %s: %w", r.Dir, err)
	}
	return s, nil
}

// Write stores an image or index at r. Blobs go first and the manifest (or
// the layout's index.json entry) last, so an interrupted write never leaves a
// name pointing at missing blobs.
func Write(ctx context.Context, c *registry.Client, r Ref, t remote.Taggable, opts ...remote.Option) error {
	if !r.IsLayout() {
		if err := c.Write(ctx, r.Remote, t, opts...); err != nil {
			return fmt.Errorf("push %s: %w", r, err)
		}
		return nil
	}
	p, err := layout.FromPath(r.Dir)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("open OCI layout %s: %w", r.Dir, err)
		}
		if err := os.MkdirAll(r.Dir, 0o755); err != nil {
			return fmt.Errorf("create OCI layout %s: %w", r.Dir, err)
		}
		if p, err = layout.Write(r.Dir, empty.Index); err != nil {
			return fmt.Errorf("create OCI layout %s: %w", r.Dir, err)
		}
	}
	tag := r.Tag
	if tag == "" {
		tag = "latest"
	}
	var lopts []layout.Option
	lopts = append(lopts, layout.WithAnnotations(map[string]string{refNameAnnotation: tag}))
	m := match.Annotation(refNameAnnotation, tag)
	switch v := t.(type) {
	case v1.ImageIndex:
		err = p.ReplaceIndex(v, m, lopts...)
	case v1.Image:
		err = p.ReplaceImage(v, m, lopts...)
	default:
		err = fmt.Errorf("cannot write %T", t)
	}
	if err != nil {
		return fmt.Errorf("write OCI layout %s: %w", r.Dir, err)
	}
	return nil
}

// BlobReaderAt gives random access to one blob of r's repository or layout:
// ranged requests to a registry, the blob file of a layout.
func BlobReaderAt(ctx context.Context, c *registry.Client, r Ref, h v1.Hash) (io.ReaderAt, func() error, error) {
	if r.IsLayout() {
		f, err := os.Open(filepath.Join(r.Dir, "blobs", h.Algorithm, h.Hex))
		if err != nil {
			return nil, nil, fmt.Errorf("open blob %s in %s: %w", h, r.Dir, err)
		}
		return f, f.Close, nil
	}
	return c.NewBlobReaderAt(ctx, r.Remote.Context(), h), func() error { return nil }, nil
}
