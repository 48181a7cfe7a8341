#compdef gloss

_gloss_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _GLOSS_COMPLETE=complete_zsh gloss)
}

compdef _gloss_completion gloss
