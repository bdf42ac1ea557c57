package convert

import (
	"context"
	"fmt"
	"runtime"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
)

// Platforms selects the images of an index to convert.
type Platforms struct {
	// All converts every image of the index.
	All bool
	// Only lists the platforms to convert; empty means the host's.
	Only []v1.Platform
}

// ParsePlatforms reads "os/arch[/variant]" values, each possibly a comma list.
func ParsePlatforms(values []string) ([]v1.Platform, error) {
	var out []v1.Platform
	for _, v := range values {
		for _, s := range strings.Split(v, ",") {
			if s = strings.TrimSpace(s); s == "" {
				continue
			}
			p, err := v1.ParsePlatform(s)
			if err != nil {
				return nil, fmt.Errorf("platform %q: %w", s, err)
			}
			out = append(out, *p)
		}
	}
	return out, nil
}

// HostPlatform is the platform of this machine.
func HostPlatform() v1.Platform {
	p := v1.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}
	if runtime.GOARCH == "arm64" {
		p.Variant = "v8"
	}
	return p
}

func (s Platforms) Match(p *v1.Platform) bool {
	if s.All {
		return true
	}
	if p == nil {
		return false
	}
	want := s.Only
	if len(want) == 0 {
		want = []v1.Platform{HostPlatform()}
	}
	for _, w := range want {
		if w.OS == p.OS && w.Architecture == p.Architecture && (w.Variant == "" || p.Variant == "" || w.Variant == p.Variant) {
			return true
		}
	}
	return false
}

// Index converts the images of idx that sel picks, platform by platform,
// into a new index holding just those.
func (c *Converter) Index(ctx context.Context, name string, idx v1.ImageIndex, sel Platforms) (v1.ImageIndex, []*ImageResult, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, nil, fmt.Errorf("%s: read index: %w", name, err)
	}
	out := mutate.IndexMediaType(empty.Index, im.MediaType)
	var results []*ImageResult
	for _, d := range im.Manifests {
		if !d.MediaType.IsImage() || !sel.Match(d.Platform) {
			continue
		}
		img, err := idx.Image(d.Digest)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: image %s: %w", name, d.Digest, err)
		}
		plat := ""
		if d.Platform != nil {
			plat = d.Platform.String()
		}
		imgName := name
		if plat != "" {
			imgName = name + " (" + plat + ")"
		}
		newImg, res, err := c.Image(ctx, imgName, img)
		if err != nil {
			return nil, nil, err
		}
		res.Platform = plat
		results = append(results, res)
		mt, err := newImg.MediaType()
		if err != nil {
			return nil, nil, err
		}
		out = mutate.AppendManifests(out, mutate.IndexAddendum{
			Add: newImg,
			Descriptor: v1.Descriptor{
				MediaType:   mt,
				Platform:    d.Platform,
				Annotations: d.Annotations,
			},
		})
	}
	if len(results) == 0 {
		var have []string
		for _, d := range im.Manifests {
			if d.Platform != nil {
				have = append(have, d.Platform.String())
			}
		}
		return nil, nil, fmt.Errorf("%s: no image for the requested platforms (index has %s)", name, strings.Join(have, ", "))
	}
	if len(im.Annotations) > 0 {
		out = mutate.Annotations(out, im.Annotations).(v1.ImageIndex)
	}
	return out, results, nil
}
