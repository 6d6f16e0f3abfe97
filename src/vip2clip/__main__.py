from vip2clip.cli import main

raise SystemExit(main())
