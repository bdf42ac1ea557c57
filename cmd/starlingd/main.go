// Command starlingd is starling's node agent: the containerd remote
// snapshotter and the P2P peer in one process.
package main

import (
	"fmt"
	"os"

	"github.com/starling-dev/starling/internal/version"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "--version" || os.Args[1] == "version") {
		fmt.Println("starlingd", version.Version)
		return
	}
	fmt.Println("starlingd", version.Version)
}
