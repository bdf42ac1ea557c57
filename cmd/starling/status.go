package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/pkg/blob"
	"github.com/starling-dev/starling/pkg/layer"
)

func init() { subcommands = append(subcommands, newStatusCmd) }

func newStatusCmd() *cobra.Command {
	var addr string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show a node's lazy layers: how local files are read, and what each layer fetched",
		Long: `status asks starlingd (its health address, :4003 by default) for the
lazy filesystem's read mode — "passthrough" when the kernel reads files whose
bytes are all local straight from the chunk store, "fuse" when every read
goes through starlingd — and for every open layer: where it is mounted, its
entries, the requests, bytes and cache hits that reading it has cost, and
where its bytes came from: the chunk store (CACHE), this node's peer storage
(LOCAL), other peers (PEERS) and the registry (ORIGIN), with the time its
fetches waited on each. --output json gives the same as stats.sources.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := fetchStatus(cmd.Context(), addr)
			if err != nil {
				return err
			}
			if g.output == "json" {
				return json.NewEncoder(os.Stdout).Encode(st)
			}
			printStatus(os.Stdout, st)
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "address", "http://127.0.0.1:4003", "starlingd's health address")
	return cmd
}

func fetchStatus(ctx context.Context, addr string) (layer.Status, error) {
	var st layer.Status
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(addr, "/")+"/status", nil)
	if err != nil {
		return st, fmt.Errorf("status from %s: %w", addr, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return st, fmt.Errorf("status from %s: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("status from %s: %s (is the snapshotter on?)", addr, resp.Status)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&st); err != nil {
		return st, fmt.Errorf("status from %s: %w", addr, err)
	}
	return st, nil
}

func printStatus(w io.Writer, st layer.Status) {
	mount := st.Mount
	if mount == "" {
		mount = "(not mounted yet)"
	}
	fmt.Fprintf(w, "lazy filesystem: %s, local files read by: %s\n", mount, st.ReadMode)
	if len(st.Layers) == 0 {
		fmt.Fprintln(w, "no lazy layers")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYER\tENTRIES\tREQUESTS\tFETCHED\tCACHE HITS\tCACHE\tLOCAL\tPEERS\tORIGIN\tMOUNTPOINT")
	for _, l := range st.Layers {
		d := l.Digest
		if len(d) > 19 {
			d = d[:19]
		}
		src := l.Stats.Sources
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n", d, l.Entries, l.Stats.FetchRequests, l.Stats.FetchedBytes, l.Stats.CacheHits,
			human(src[blob.SourceCache].Bytes), sourceCell(src[blob.SourceLocal]), sourceCell(src[blob.SourcePeer]), sourceCell(src[blob.SourceOrigin]), l.Mountpoint)
	}
	tw.Flush()
	fmt.Fprintln(w, "CACHE: bytes reads found in the chunk store; LOCAL, PEERS, ORIGIN: blob bytes fetched from this node's peer storage, other peers, the registry / time fetches waited on them")
}

// sourceCell shows what one source gave a layer: bytes and time waited.
func sourceCell(c blob.SourceCount) string {
	if c.Bytes == 0 && c.WaitSeconds == 0 {
		return "-"
	}
	return human(c.Bytes) + "/" + (time.Duration(c.WaitSeconds * float64(time.Second))).Round(time.Millisecond).String()
}
