package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/pkg/convert"
	"github.com/starling-dev/starling/pkg/imageref"
	"github.com/starling-dev/starling/pkg/progress"
)

func init() { subcommands = append(subcommands, newConvertCmd) }

// convertOutput is what `convert --output json` prints.
type convertOutput struct {
	Source      string                 `json:"source"`
	Destination string                 `json:"destination"`
	Digest      string                 `json:"digest"`
	MediaType   string                 `json:"media_type"`
	Images      []*convert.ImageResult `json:"images"`
	Seconds     float64                `json:"seconds"`
}

func newConvertCmd() *cobra.Command {
	var (
		opts        convert.Options
		prioFile    string
		platforms   []string
		allPlatform bool
	)
	cmd := &cobra.Command{
		Use:   "convert SRC DST",
		Short: "Convert an image to eStargz (or zstd:chunked) for lazy pulling",
		Long: `Convert an image to eStargz (or zstd:chunked) so that it can be pulled lazily.
SRC and DST are registry references or OCI layouts written oci:DIR[:TAG].
Every gzip or uncompressed layer is rebuilt with the reference estargz module;
layers that are eStargz already are kept. All blobs are written before the
manifest, so a failed conversion leaves nothing at DST.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			start := time.Now()
			c, err := registryClient(cmd)
			if err != nil {
				return err
			}
			src, err := imageref.Parse(args[0], c)
			if err != nil {
				return err
			}
			dst, err := imageref.Parse(args[1], c)
			if err != nil {
				return err
			}
			if prioFile != "" {
				if opts.PrioritizedFiles, err = readLines(prioFile); err != nil {
					return fmt.Errorf("--prioritized-files: %w", err)
				}
			}
			sel := convert.Platforms{All: allPlatform}
			if sel.Only, err = convert.ParsePlatforms(platforms); err != nil {
				return err
			}
			ctx := cmd.Context()
			source, err := imageref.Load(ctx, c, src)
			if err != nil {
				return err
			}
			prog := progress.New(os.Stderr, progress.ModeFor(g.output, os.Stderr))
			if g.output == "json" {
				// JSON progress lines would mix with the result on a terminal
				// that merges streams; the result alone is what scripts want.
				prog = progress.New(os.Stderr, progress.Quiet)
			}
			opts.Progress = prog
			conv := convert.New(opts)
			defer conv.Close()

			out := convertOutput{Source: src.String(), Destination: dst.String()}
			if source.Index != nil {
				idx, results, err := conv.Index(ctx, src.String(), source.Index, sel)
				prog.Wait()
				if err != nil {
					return fmt.Errorf("convert %w", err)
				}
				if err := imageref.Write(ctx, c, dst, idx); err != nil {
					return err
				}
				d, _ := idx.Digest()
				mt, _ := idx.MediaType()
				out.Digest, out.MediaType, out.Images = d.String(), string(mt), results
			} else {
				img, res, err := conv.Image(ctx, src.String(), source.Image)
				prog.Wait()
				if err != nil {
					return fmt.Errorf("convert %w", err)
				}
				if err := imageref.Write(ctx, c, dst, img); err != nil {
					return err
				}
				mt, _ := img.MediaType()
				out.Digest, out.MediaType, out.Images = res.Digest.String(), string(mt), []*convert.ImageResult{res}
			}
			out.Seconds = time.Since(start).Seconds()
			if g.output == "json" {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			}
			kept, built, asIs := 0, 0, 0
			for _, im := range out.Images {
				for _, l := range im.Layers {
					switch {
					case l.NotLazy != "":
						asIs++
					case l.Kept:
						kept++
					default:
						built++
					}
				}
			}
			extra := ""
			if asIs > 0 {
				// The warning naming each layer and entry is in the log.
				extra = fmt.Sprintf(", %d left as they were: they will not mount lazily", asIs)
			}
			fmt.Printf("converted %s -> %s: %s (%d layers built, %d kept%s) in %.1fs\n",
				src, dst, out.Digest, built, kept, extra, out.Seconds)
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&opts.ChunkSize, "chunk-size", 0, "largest uncompressed chunk of a file in bytes (0: 4 MiB)")
	f.IntVar(&opts.MinChunkSize, "min-chunk-size", 0, "pack files smaller than this into shared compressed streams (0: off)")
	f.IntVar(&opts.CompressionLevel, "compression-level", 0, "gzip level 1-9 or zstd level (0: gzip 9, zstd 3)")
	f.StringVar(&prioFile, "prioritized-files", "", "file listing paths, one per line, to put before the prefetch landmark")
	f.BoolVar(&opts.ZstdChunked, "zstdchunked", false, "write zstd:chunked layers instead of gzip eStargz")
	f.StringSliceVar(&platforms, "platform", nil, "platforms of an index to convert, os/arch[/variant] (default: this host's)")
	f.BoolVar(&allPlatform, "all-platforms", false, "convert every platform of an index")
	f.IntVar(&opts.Jobs, "jobs", 0, "layers converted at once (0: number of CPUs)")
	return cmd
}

func readLines(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return out, sc.Err()
}
