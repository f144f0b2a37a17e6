"""The deployment: what serves a class from one machine (a Space, a lab's GPU).

`Server` holds the models and the sessions of the people using them, and every bound a
public deployment needs; a `Session` is one person's runs and the use cases around them;
`sharing` computes identical prunes of many sessions once; `uploads` bounds what strangers
upload; `soak` simulates a class against a running app.
The science (pruning, scoring, the shared `Workbench`) lives one level up and knows
nothing of this package.
"""
