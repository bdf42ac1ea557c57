// Package preheat puts the blobs of an image on seed peers before anyone
// needs them. A Plan lists the blobs (the layers and config of each image of
// a reference, once each); a Job asks each blob's scheduler, picked by
// rendezvous hashing as peers pick it, to have a seed fetch the blob from the
// registry, then follows the schedulers until a seed holds every blob.
package preheat

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/proxy"
	"github.com/starling-dev/starling/pkg/registry"
)

// Blob is one blob to put on a seed peer.
type Blob struct {
	// Work is what the seed is asked to do: task ID, origin URL, headers.
	Work      *schedulerpb.Work
	Size      int64
	Kind      string   // "layer" or "config"
	Platforms []string // the platforms whose image holds it
}

// Plan is what an image reference resolves to.
type Plan struct {
	Reference string
	Digest    string // of the manifest or index the reference names
	Blobs     []*Blob
}

// maxIndexDepth bounds nested indexes, which a registry could make endless.
const maxIndexDepth = 4

// NewPlan resolves ref to the blobs to preheat: the layers and config of
// each of its images (those of platforms, or all, for an index), once each.
// Of hdr only what peer.WorkHeader keeps (Accept) goes to the seeds: no
// credential travels; each seed uses its own node's.
func NewPlan(ctx context.Context, c *registry.Client, ref name.Reference, platforms []*v1.Platform, hdr http.Header) (*Plan, error) {
	desc, err := c.Get(ctx, ref)
	if err != nil {
		return nil, err
	}
	p := &planner{ref: ref, hdr: hdr, platforms: platforms, seen: map[string]*Blob{},
		plan: &Plan{Reference: ref.Name(), Digest: desc.Digest.String()}}

	if !desc.MediaType.IsIndex() {
		img, err := desc.Image()
		if err != nil {
			return nil, err
		}
		platform := ""
		if cf, err := img.ConfigFile(); err == nil && cf.OS != "" {
			pl := cf.Platform()
			platform = pl.String()
			if len(platforms) > 0 && !matchesAny(*pl, platforms) {
				return nil, fmt.Errorf("the image is %s, not %s", platform, platformList(platforms))
			}
		}
		if err := p.addImage(img, platform); err != nil {
			return nil, err
		}
		return p.plan, nil
	}

	idx, err := desc.ImageIndex()
	if err != nil {
		return nil, err
	}
	if err := p.walk(idx, 0); err != nil {
		return nil, err
	}
	if len(p.plan.Blobs) == 0 {
		if len(platforms) > 0 {
			return nil, fmt.Errorf("no image for %s in the index", platformList(platforms))
		}
		return nil, errors.New("the index holds no image")
	}
	return p.plan, nil
}

type planner struct {
	ref       name.Reference
	hdr       http.Header
	platforms []*v1.Platform
	seen      map[string]*Blob
	plan      *Plan
}

func (p *planner) add(d v1.Descriptor, kind, platform string) error {
	if b := p.seen[d.Digest.String()]; b != nil {
		if platform != "" && !slices.Contains(b.Platforms, platform) {
			b.Platforms = append(b.Platforms, platform)
		}
		return nil
	}
	u := registry.BlobURL(p.ref.Context(), d.Digest)
	pu, err := url.Parse(u)
	if err != nil {
		return fmt.Errorf("blob URL %s: %w", u, err)
	}
	// The task the proxy serves this blob of this registry from, so that
	// what the seed fetched is what mirror clients get.
	id, ok := proxy.RegistryTaskID(pu)
	if !ok {
		return fmt.Errorf("blob URL %s names no blob", u)
	}
	w := &schedulerpb.Work{TaskId: id, Url: u, Digest: d.Digest.String(), Header: map[string]*schedulerpb.HeaderValues{}}
	// No credential travels with the work: the seed fetches with its
	// own node's credentials.
	for k, vs := range peer.WorkHeader(p.hdr) {
		w.Header[k] = &schedulerpb.HeaderValues{Values: vs}
	}
	b := &Blob{Work: w, Size: d.Size, Kind: kind}
	if platform != "" {
		b.Platforms = []string{platform}
	}
	p.seen[d.Digest.String()] = b
	p.plan.Blobs = append(p.plan.Blobs, b)
	return nil
}

func (p *planner) addImage(img v1.Image, platform string) error {
	m, err := img.Manifest()
	if err != nil {
		return fmt.Errorf("manifest of %s: %w", platformOr(platform, p.ref.Name()), err)
	}
	if err := p.add(m.Config, "config", platform); err != nil {
		return err
	}
	for _, l := range m.Layers {
		// Foreign layers live elsewhere and are not the registry's to serve.
		if !l.MediaType.IsDistributable() {
			continue
		}
		if err := p.add(l, "layer", platform); err != nil {
			return err
		}
	}
	return nil
}

func (p *planner) walk(idx v1.ImageIndex, depth int) error {
	if depth > maxIndexDepth {
		return errors.New("indexes nested too deep")
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return err
	}
	for _, m := range im.Manifests {
		switch {
		case m.MediaType.IsIndex():
			child, err := idx.ImageIndex(m.Digest)
			if err != nil {
				return fmt.Errorf("index %s: %w", m.Digest, err)
			}
			if err := p.walk(child, depth+1); err != nil {
				return err
			}
		case m.MediaType.IsImage():
			// BuildKit's attestations are manifests too, of no platform.
			if m.Annotations["vnd.docker.reference.type"] == "attestation-manifest" {
				continue
			}
			platform := ""
			if m.Platform != nil {
				platform = m.Platform.String()
				if m.Platform.OS == "unknown" {
					continue
				}
			}
			if len(p.platforms) > 0 && (m.Platform == nil || !matchesAny(*m.Platform, p.platforms)) {
				continue
			}
			img, err := idx.Image(m.Digest)
			if err != nil {
				return fmt.Errorf("image %s (%s): %w", m.Digest, platformOr(platform, "no platform"), err)
			}
			if err := p.addImage(img, platform); err != nil {
				return err
			}
		}
	}
	return nil
}

func matchesAny(p v1.Platform, specs []*v1.Platform) bool {
	for _, s := range specs {
		if p.Satisfies(*s) {
			return true
		}
	}
	return false
}

func platformList(ps []*v1.Platform) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	return strings.Join(s, ", ")
}

func platformOr(p, alt string) string {
	if p != "" {
		return p
	}
	return alt
}
