package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/pkg/convert"
	"github.com/starling-dev/starling/pkg/imageref"
	"github.com/starling-dev/starling/pkg/inspect"
)

func init() { subcommands = append(subcommands, newInspectCmd) }

type inspectOutput struct {
	Reference string          `json:"reference"`
	Digest    string          `json:"digest"`
	Platform  string          `json:"platform,omitempty"`
	Layers    []inspect.Layer `json:"layers"`
}

func newInspectCmd() *cobra.Command {
	var (
		showTOC  bool
		layerSel string
		platform string
	)
	cmd := &cobra.Command{
		Use:   "inspect REF",
		Short: "Show the format of each layer of an image and check eStargz TOCs",
		Long: `Show, for each layer of an image, its media type and format (gzip, eStargz,
zstd:chunked, uncompressed), sizes, whether its TOC matches the manifest's
annotation, how many entries and chunks it has and how large its prioritized
(prefetch) region is. Only footers and TOCs are read, with ranged requests.
REF is a registry reference or oci:DIR[:TAG].`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := registryClient(cmd)
			if err != nil {
				return err
			}
			ref, err := imageref.Parse(args[0], c)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			src, err := imageref.Load(ctx, c, ref)
			if err != nil {
				return err
			}
			img := src.Image
			plat := ""
			if src.Index != nil {
				want := convert.HostPlatform()
				if platform != "" {
					p, err := v1.ParsePlatform(platform)
					if err != nil {
						return fmt.Errorf("--platform: %w", err)
					}
					want = *p
				}
				im, err := src.Index.IndexManifest()
				if err != nil {
					return fmt.Errorf("inspect %s: %w", ref, err)
				}
				sel := convert.Platforms{Only: []v1.Platform{want}}
				for _, d := range im.Manifests {
					if d.Platform != nil && d.MediaType.IsImage() && sel.Match(d.Platform) {
						if img, err = src.Index.Image(d.Digest); err != nil {
							return fmt.Errorf("inspect %s: %w", ref, err)
						}
						plat = d.Platform.String()
						break
					}
				}
				if img == nil {
					return fmt.Errorf("inspect %s: no image for platform %s", ref, want.String())
				}
			}
			m, err := img.Manifest()
			if err != nil {
				return fmt.Errorf("inspect %s: %w", ref, err)
			}
			dg, _ := img.Digest()
			out := inspectOutput{Reference: ref.String(), Digest: dg.String(), Platform: plat}
			tocs := make([]*estargz.JTOC, len(m.Layers))
			for i, d := range m.Layers {
				ra, closeFn, err := imageref.BlobReaderAt(ctx, c, ref, d.Digest)
				if err != nil {
					return fmt.Errorf("inspect %s layer %d %s: %w", ref, i+1, d.Digest, err)
				}
				l, toc := inspect.Inspect(i, d, ra)
				_ = closeFn()
				out.Layers = append(out.Layers, l)
				tocs[i] = toc
			}
			if showTOC {
				i, err := pickLayer(layerSel, m.Layers)
				if err != nil {
					return fmt.Errorf("inspect %s: %w", ref, err)
				}
				if tocs[i] == nil {
					return fmt.Errorf("inspect %s layer %d %s: not eStargz or zstd:chunked, it has no TOC", ref, i+1, m.Layers[i].Digest)
				}
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(tocs[i])
			}
			if g.output == "json" {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			}
			fmt.Printf("%s %s", out.Reference, out.Digest)
			if plat != "" {
				fmt.Printf(" (%s)", plat)
			}
			fmt.Println()
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "#\tDIGEST\tFORMAT\tSIZE\tUNCOMPRESSED\tTOC\tENTRIES\tCHUNKS\tPREFETCH")
			for _, l := range out.Layers {
				toc := "-"
				if l.TOCMatch != nil {
					toc = "mismatch"
					if *l.TOCMatch {
						toc = "ok"
					}
				}
				fmt.Fprintf(tw, "%d\t%.19s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", l.Index+1, l.Digest, l.Format,
					human(l.Size), human(l.UncompressedSize), toc, count(l.Entries, l.TOCMatch), count(l.Chunks, l.TOCMatch), prefetch(l))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, l := range out.Layers {
				if l.Error != "" {
					fmt.Printf("layer %d %s: %s\n", l.Index+1, l.Digest, l.Error)
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&showTOC, "toc", false, "print a layer's TOC as JSON")
	cmd.Flags().StringVar(&layerSel, "layer", "", "the layer for --toc: its number (1 is the lowest) or digest (default: the last lazy layer)")
	cmd.Flags().StringVar(&platform, "platform", "", "platform to inspect in an index (default: this host's)")
	return cmd
}

func pickLayer(sel string, layers []v1.Descriptor) (int, error) {
	if sel == "" {
		for i := len(layers) - 1; i >= 0; i-- {
			if _, ok := layers[i].Annotations[convert.TOCDigestAnnotation]; ok {
				return i, nil
			}
		}
		return len(layers) - 1, nil
	}
	if n, err := strconv.Atoi(sel); err == nil {
		if n < 1 || n > len(layers) {
			return 0, fmt.Errorf("--layer %d: the image has %d layers", n, len(layers))
		}
		return n - 1, nil
	}
	for i, l := range layers {
		if l.Digest.String() == sel || strings.HasPrefix(l.Digest.Hex, strings.TrimPrefix(sel, "sha256:")) {
			return i, nil
		}
	}
	return 0, fmt.Errorf("--layer %s: no such layer", sel)
}

func human(n int64) string {
	if n < 0 {
		return "-"
	}
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func count(n int, lazy *bool) string {
	if lazy == nil {
		return "-"
	}
	return strconv.Itoa(n)
}

func prefetch(l inspect.Layer) string {
	switch l.Landmark {
	case "prefetch":
		return human(l.PrefetchSize)
	case "no-prefetch":
		return "none"
	}
	return "-"
}
